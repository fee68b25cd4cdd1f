"""benchmarks/gpu_proof.sh's own logic, with stand-ins for python3 and
compute-sanitizer: the GPU run it exists for gets one try in a short device
lease, so its step order, side-by-side steps, budget and exit status are
checked here first. Nothing is built and no GPU is used."""

from __future__ import annotations

import os
import pathlib
import re
import stat
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_proof.sh"

# Every call prints when it starts and ends (into the step's log) and sleeps
# 2 s, so that steps started side by side overlap even on a loaded machine;
# a call whose arguments contain $FAKE_FAIL exits 3. No xdist, so the steps'
# pytest commands carry no -n.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in *"import xdist"*) exit 1 ;; esac
echo "start $(date +%s.%N) $*"
sleep 2
echo "end $(date +%s.%N)"
if [ -n "${FAKE_FAIL:-}" ] && [[ "$*" == *"$FAKE_FAIL"* ]]; then exit 3; fi
"""
# Drops the sanitizer's own options and runs what it would check.
FAKE_SANITIZER = """#!/usr/bin/env bash
while [ "$#" -gt 0 ] && [ "$1" != python3 ]; do shift; done
exec "$@"
"""


def run_script(tmp_path, *args, fail=""):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python3", FAKE_PYTHON), ("compute-sanitizer", FAKE_SANITIZER)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(out),
               FAKE_FAIL=fail)
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=120)
    summary = proc.stdout.split("=== summary")[-1].splitlines()[1:]
    return proc, out, summary


def outcomes(summary):
    """{step: outcome} from the summary's lines, their times left out."""
    found = {}
    for line in summary:
        step, outcome = re.fullmatch(r"(\w+): (ok|FAILED \(exit \d+\) after|TIMED OUT after|"
                                     r"skipped \(budget\))(?:,? \d+ s)?", line).groups()
        assert step not in found, summary
        found[step] = outcome
    return found


def interval(out, step):
    """(first start, last end) of the calls a step's log records."""
    log = (out / f"{step}.log").read_text()
    starts = [float(t) for t in re.findall(r"^start (\S+)", log, re.M)]
    ends = [float(t) for t in re.findall(r"^end (\S+)", log, re.M)]
    assert starts and len(starts) == len(ends), log
    return min(starts), max(ends)


def test_default_steps_run_checks_side_by_side_after_the_benchmark(tmp_path):
    proc, out, summary = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert outcomes(summary) == dict.fromkeys(
        ["build", "demo", "bench", "gpu", "sanitizer", "suite"], "ok"), proc.stdout
    spans = {step: interval(out, step) for step in ("build", "demo", "bench", "gpu",
                                                     "sanitizer", "suite")}
    assert spans["build"][1] <= spans["demo"][0] and spans["demo"][1] <= spans["bench"][0]
    checks = [spans[step] for step in ("gpu", "sanitizer", "suite")]
    assert spans["bench"][1] <= min(start for start, _ in checks)  # bench had the machine alone
    assert max(start for start, _ in checks) < min(end for _, end in checks)  # side by side
    # The sanitizer runs its part of test_gpu.py; the suite all but test_gpu.py.
    assert "-x tests/test_gpu.py -k" in (out / "sanitizer.log").read_text()
    assert "--ignore=tests/test_gpu.py" in (out / "suite.log").read_text()


def test_a_failed_step_fails_the_run_but_not_the_steps_beside_it(tmp_path):
    proc, _, summary = run_script(tmp_path, "demo", "gpu+suite", fail="--ignore=tests/test_gpu.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert outcomes(summary) == {"demo": "ok", "gpu": "ok", "suite": "FAILED (exit 3) after"}


def test_steps_left_without_budget_are_skipped_and_fail_the_run(tmp_path):
    # 30 s: demo runs (2 s or more), then less than the 30 s a step needs is left.
    proc, _, summary = run_script(tmp_path, "--budget", "30", "demo", "bench+gpu")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert outcomes(summary) == {"demo": "ok", "bench": "skipped (budget)",
                                 "gpu": "skipped (budget)"}


def test_unknown_step_in_a_group_is_refused_before_anything_runs(tmp_path):
    proc, out, _ = run_script(tmp_path, "demo", "gpu+suit")
    assert proc.returncode == 2
    assert "unknown step: suit" in proc.stdout
    assert not (out / "demo.log").exists()
