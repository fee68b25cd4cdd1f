"""CPU benchmark: jax_roipool vs torchvision.ops.roi_pool (Fast R-CNN RoI pooling).

Workload (``_workloads.FRCNN``): N=2, C=256, 50x68 feature map, R=1024 rois,
7x7 output, spatial_scale 1/16, float32; boxes uniform 16..400 px wide/high
inside an 800x1088 image (see ``_workloads.py`` for the distribution); fixed
seed.

Measured in one run (medians of all samples; every timed call is synchronised
with ``jax.block_until_ready``; the ours / torchvision measurements are
interleaved, round by round):

* jax_roipool native kernels, NHWC and NCHW: jitted forward, and jitted
  forward+backward (``jax.vjp``: output and feature gradient for a fixed
  cotangent);
* torchvision.ops.roi_pool on CPU (NCHW), forward (no_grad) and
  forward+backward (``torch.autograd.grad`` with the same cotangent), in a
  worker process (``_torchvision_worker.py``) started with ``--torch-python``;
* the pure-jnp fallback ``jax_roipool.reference.roi_pool`` (NHWC), forward and
  forward+backward, each in a child process under a memory limit and a
  timeout (reported as OOM / timeout instead of crashing).

Before timing, torchvision's forward output, argmax and feature gradient are
compared with ours bit for bit (the cotangent is dyadic, so gradient sums are
exact in any order).

    python benchmarks/bench_cpu.py            # prints the table
    python benchmarks/bench_cpu.py --save     # also benchmarks/results/cpu-<date>.{md,json}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _timing  # noqa: E402
from _workloads import FRCNN, make_arrays  # noqa: E402

DEFAULT_TORCH_PYTHON = os.path.join(os.path.dirname(HERE), ".venv-torch", "bin", "python")
MODES = ("forward", "forward_backward")
TARGETS = {"forward": 10.0, "forward_backward": 8.0}  # speed-up vs torchvision CPU (the issue)


# --------------------------------------------------------------------------- torchvision worker


class TorchWorker:
    """A ``_torchvision_worker.py`` process speaking JSON lines."""

    def __init__(self, python: str, data_path: str, threads: int | None):
        cmd = [python, os.path.join(HERE, "_torchvision_worker.py"), "--data", data_path]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=None, text=True, bufsize=1)
        self.info = self._read()
        if not self.info.get("ready"):
            raise RuntimeError(f"torchvision worker did not start: {self.info}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torchvision worker exited (code {self.proc.wait()}); "
                               "see its stderr above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"torchvision worker: {reply['error']}\n{reply.get('traceback', '')}")
        return reply

    def request(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request(cmd="quit")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --------------------------------------------------------------------------- reference child


def _child_reference(data_path: str, mode: str, warmup: int, repeats: int, mem_bytes: int,
                     rois: int | None) -> None:
    """Runs in a child process: times the pure-jnp fallback, prints one JSON line.

    The address-space limit is set here, before jax starts its threads (a
    preexec_fn in the multithreaded parent could deadlock), so an oversized
    allocation fails with RESOURCE_EXHAUSTED instead of exhausting the machine.
    """
    if mem_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    from _jaxbench import JaxRoiPool

    with np.load(data_path) as d:
        arrays = {k: d[k] for k in d.files}
    if rois:
        arrays["rois"], arrays["cotangent"] = arrays["rois"][:rois], arrays["cotangent"][:rois]
    bench = JaxRoiPool(arrays, "NHWC", impl="reference")
    call = bench.call(mode)
    start = time.perf_counter()
    bench.sync(call())
    first = time.perf_counter() - start
    timing = _timing.measure(call, sync=bench.sync, warmup=max(warmup - 1, 0), repeats=repeats)
    print(json.dumps({"samples": timing.samples, "first_call_s": first}), flush=True)


def run_reference(data_path: str, mode: str, *, warmup: int, repeats: int, timeout: float,
                  mem_bytes: int, rois: int | None = None) -> dict:
    """{"samples": [...]} or {"status": "OOM" | "timeout" | "error", "detail": ...}.

    ``rois``: time only the first ``rois`` rois of the workload.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--child-reference", mode,
           "--data", data_path, "--warmup", str(warmup), "--repeats", str(repeats),
           "--child-mem", str(int(mem_bytes))]
    if rois:
        cmd += ["--child-rois", str(rois)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "detail": f"> {timeout:g} s"}
    out = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and out:
        try:
            return json.loads(out[-1])
        except json.JSONDecodeError:
            pass
    err = proc.stderr
    oom_words = ("RESOURCE_EXHAUSTED", "Out of memory", "MemoryError", "bad_alloc",
                 "Cannot allocate memory")
    status = "OOM" if any(w in err for w in oom_words) or proc.returncode in (-9, 137) else "error"
    tail = [l for l in err.strip().splitlines() if l.strip()][-1:] or [f"exit {proc.returncode}"]
    return {"status": status, "detail": tail[0][:300]}


# --------------------------------------------------------------------------- breakdown


def breakdown(ours: dict, wl, repeats: int) -> tuple[dict, str]:
    """Where the native time goes: forward, backward alone, and XLA's cost of simply
    producing an output-sized buffer (fresh allocations > 32 MiB are mmapped by glibc
    and page-faulted on first touch on every call)."""
    import jax
    import jax.numpy as jnp

    res = {}
    for layout, bench in ours.items():
        for mode in ("forward", "backward", "forward_backward"):
            t = _timing.measure(bench.call(mode), sync=bench.sync, warmup=2, repeats=repeats)
            res[f"native {layout} {mode}"] = t.median
    ph, pw = wl.output_size
    x = jnp.ones((wl.r, ph, pw, wl.c), jnp.float32)
    one = jax.jit(lambda a: a * 2.0)
    res["floor out"] = _timing.measure(lambda: one(x), sync=jax.block_until_ready,
                                       warmup=2, repeats=repeats).median
    rows = []
    for layout in ours:
        rows.append([f"native {layout}", _timing.fmt_ms(res[f"native {layout} forward"]),
                     _timing.fmt_ms(res[f"native {layout} backward"]),
                     _timing.fmt_ms(res[f"native {layout} forward_backward"])])
    mb = wl.output_bytes / 2**20
    text = "\n".join([
        "Breakdown (medians, not interleaved):", "",
        _timing.markdown_table(["", "forward ms", "backward alone ms", "fwd+bwd ms"], rows), "",
        f"- XLA floor, jitted 2x of a [{wl.r},{ph},{pw},{wl.c}] f32 array (writes "
        f"{mb:.0f} MiB, like the forward's output): {_timing.fmt_ms(res['floor out'])} ms"])
    return res, text


# --------------------------------------------------------------------------- main benchmark


def default_torch_python() -> str:
    return DEFAULT_TORCH_PYTHON if os.path.exists(DEFAULT_TORCH_PYTHON) else sys.executable


def default_mem_limit() -> int:
    available = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    cap = 12 * 2**30
    return int(min(cap, 0.6 * available)) if available else cap


def run(args) -> int:
    import jax

    from _jaxbench import JaxRoiPool, compare, versions

    wl = FRCNN
    arrays = make_arrays(wl, seed=args.seed)
    info = {"date": datetime.date.today().isoformat(), "workload": wl.describe(),
            "host": _timing.host_info(), "versions": versions()}
    if jax.default_backend() != "cpu":
        print(f"note: jax default backend is {jax.default_backend()}; forcing CPU devices")
    device = jax.devices("cpu")[0]

    print(f"# jax_roipool CPU benchmark, {info['date']}")
    print(f"workload: {wl.describe()}")
    host = info["host"]
    print(f"cpu: {host['cpu']}; {host['usable_cpus']} usable of {host['cpu_count']} cpus")
    v = info["versions"]
    print(f"jax {v['jax']}, jaxlib {v['jaxlib']}, jax_roipool {v['jax_roipool']} "
          f"({v['cpu_kernels']} CPU kernels), numpy {v['numpy']}, python {host['python']}")
    if host["env"]:
        print(f"env: {host['env']}")
    print(f"load average at start: {host['loadavg']} (anything else running skews the "
          f"numbers); transparent hugepages: {host['transparent_hugepage']}")
    if host["loadavg"] and host["loadavg"][0] > 0.5:
        print("WARNING: the machine is busy")

    ours = {layout: JaxRoiPool(arrays, layout, "native", device) for layout in ("NHWC", "NCHW")}
    for layout, bench in ours.items():
        targets = bench.custom_call_targets()
        info.setdefault("custom_calls", {})[layout] = sorted(targets)
        missing = [t for t in ("roipool_forward",) if t not in targets]
        if missing:
            print(f"WARNING: {layout}: native target(s) {missing} not in the lowered HLO "
                  f"(found {sorted(targets)}): the native kernels are not being used")

    tmp = tempfile.TemporaryDirectory(prefix="roipool_bench_")
    data_path = os.path.join(tmp.name, "workload.npz")
    np.savez(data_path, **arrays)

    worker = None
    if not args.skip_torch:
        print(f"torchvision worker: {args.torch_python}")
        worker = TorchWorker(args.torch_python, data_path, args.torch_threads)
        info["torch"] = {k: worker.info[k] for k in worker.info if k != "ready"}
        print(f"torch {worker.info['torch']}, torchvision {worker.info['torchvision']}, "
              f"torch threads {worker.info['torch_threads']} (torchvision's CPU roi_pool "
              "kernels themselves are single-threaded loops)")

    try:
        # ------------------------------------------------------------ correctness first
        checks = {}
        if worker is not None:
            theirs_path = os.path.join(tmp.name, "torchvision.npz")
            worker.request(cmd="save", path=theirs_path)
            with np.load(theirs_path) as d:
                theirs = {k: d[k] for k in d.files}
            for layout, bench in ours.items():
                checks[layout] = compare(bench.results(), theirs, arrays["rois"], wl.h, wl.w)
            print("check vs torchvision (forward output, argmax, feature gradient):")
            for layout, rep in checks.items():
                print(f"  {layout}: " + ", ".join(f"{k} {v}" for k, v in rep.items()))
            info["checks"] = checks
            if any("MISMATCH" in v for rep in checks.values() for v in rep.values()):
                print("WARNING: results differ from torchvision (timings follow anyway)")

        # ------------------------------------------------------------ interleaved timing
        samples: dict[str, dict[str, list[float]]] = {
            name: {m: [] for m in MODES} for name in ("native NHWC", "native NCHW", "torchvision")}
        first_calls = {}
        for layout, bench in ours.items():
            for mode in MODES:
                start = time.perf_counter()
                bench.sync(bench.call(mode)())
                first_calls[f"native {layout} {mode}"] = time.perf_counter() - start
        info["first_call_s"] = first_calls
        t0 = time.perf_counter()
        for rnd in range(args.rounds):
            warmup = args.warmup if rnd == 0 else 1
            for mode in MODES:
                for layout, bench in ours.items():
                    t = _timing.measure(bench.call(mode), sync=bench.sync, warmup=warmup,
                                        repeats=args.repeats)
                    samples[f"native {layout}"][mode] += t.samples
                if worker is not None:
                    reply = worker.request(cmd="time", mode=mode, warmup=warmup,
                                           repeats=args.repeats)
                    samples["torchvision"][mode] += reply["samples"]
            print(f"  round {rnd + 1}/{args.rounds} done ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
        if worker is not None:
            worker.close()
            worker = None

        # ------------------------------------------------------------ pure-jnp fallback
        reference, reference_subset = {}, {}
        if not args.skip_reference:
            mem = args.reference_mem_gb * 2**30 if args.reference_mem_gb else default_mem_limit()
            for mode in MODES:
                print(f"pure-jnp reference {mode} (child process, memory limit "
                      f"{mem / 2**30:.1f} GiB, timeout {args.reference_timeout:g} s) ...",
                      flush=True)
                reference[mode] = run_reference(
                    data_path, mode, warmup=1, repeats=args.reference_repeats,
                    timeout=args.reference_timeout, mem_bytes=mem)
                r = reference[mode]
                print("  " + (f"median {_timing.fmt_ms(np.median(r['samples']))} ms"
                              if "samples" in r else f"{r['status']}: {r['detail']}"))
            subset = args.reference_subset_rois
            if subset and subset < wl.r and any("samples" not in r for r in reference.values()):
                print(f"pure-jnp reference on the first {subset} rois only (to estimate it) ...",
                      flush=True)
                for mode in MODES:
                    r = run_reference(data_path, mode, warmup=1, repeats=args.reference_repeats,
                                      timeout=args.reference_timeout, mem_bytes=mem, rois=subset)
                    reference_subset[mode] = r
                    print(f"  {mode}: " + (f"median {_timing.fmt_ms(np.median(r['samples']))} ms"
                                           if "samples" in r else f"{r['status']}: {r['detail']}"))
        breakdown_text = ""
        if args.breakdown:
            info["breakdown_s"], breakdown_text = breakdown(ours, wl, args.repeats)
        info["reference"] = reference
        info["reference_subset"] = {"rois": args.reference_subset_rois, **reference_subset}
    finally:
        if worker is not None:
            worker.close()
        tmp.cleanup()

    # ---------------------------------------------------------------- report
    med = {name: {m: (float(np.median(s)) if s else None) for m, s in d.items()}
           for name, d in samples.items()}
    for mode, r in reference.items():
        med.setdefault("reference NHWC", {})[mode] = (float(np.median(r["samples"]))
                                                      if "samples" in r else None)
    info["samples_s"] = samples
    info["median_s"] = med
    tv = med.get("torchvision", {})

    def ratio(name, mode):
        t, base = med.get(name, {}).get(mode), tv.get(mode)
        return base / t if t and base else None

    def cell(name, mode):
        t = med.get(name, {}).get(mode)
        source = reference_subset if name == "reference subset" else reference
        if t is None and name.startswith("reference") and mode in source:
            return source[mode].get("status", "n/a")
        return _timing.fmt_ms(t)

    subset = args.reference_subset_rois
    scale_up = wl.r / subset if subset else None
    for mode, r in reference_subset.items():
        med.setdefault("reference subset", {})[mode] = (
            float(np.median(r["samples"])) * scale_up if "samples" in r else None)

    rows = []
    labels = {"native NHWC": "jax_roipool native", "native NCHW": "jax_roipool native",
              "reference NHWC": "jax_roipool.reference (pure jnp)",
              "torchvision": "torchvision.ops.roi_pool",
              "reference subset": (f"jax_roipool.reference, first {subset} rois, "
                                   f"time x{scale_up:g} (estimate)" if subset else "")}
    for name in ("native NHWC", "native NCHW", "reference NHWC", "reference subset",
                 "torchvision"):
        if name not in med or (name == "torchvision" and args.skip_torch):
            continue
        layout = "NHWC" if name == "reference subset" else (
            name.split()[-1] if name != "torchvision" else "NCHW")
        rows.append([labels[name], layout, cell(name, "forward"), cell(name, "forward_backward"),
                     _timing.fmt_ratio(ratio(name, "forward")) if name != "torchvision" else "1.0x",
                     _timing.fmt_ratio(ratio(name, "forward_backward"))
                     if name != "torchvision" else "1.0x"])
    n_samples = args.rounds * args.repeats
    table = _timing.markdown_table(
        ["implementation", "layout", "forward ms", "fwd+bwd ms", "fwd speed-up",
         "fwd+bwd speed-up"], rows, left=2)
    verdicts = []
    if not args.skip_torch:
        for mode in MODES:
            for layout in ("NHWC", "NCHW"):
                r = ratio(f"native {layout}", mode)
                if r is not None:
                    ok = r >= TARGETS[mode]
                    verdicts.append(f"{mode} {layout}: {r:.1f}x vs target {TARGETS[mode]:g}x "
                                    f"-> {'MET' if ok else 'MISSED'}")
    info["targets"] = verdicts

    lines = [f"# jax_roipool CPU benchmark ({info['date']})", "",
             f"- workload: {wl.describe()} (seed {args.seed})",
             f"- cpu: {host['cpu']}, {host['usable_cpus']} usable cpus, load average at "
             f"start {host['loadavg']}, end {_timing.load_average()}"
             + (f", env {host['env']}" if host["env"] else ""),
             f"- jax {v['jax']}, jaxlib {v['jaxlib']}, jax_roipool {v['jax_roipool']} "
             f"({v['cpu_kernels']} CPU kernels), numpy {v['numpy']}, python {host['python']}"]
    if "torch" in info:
        t = info["torch"]
        lines.append(f"- torch {t['torch']}, torchvision {t['torchvision']} "
                     f"({t['torch_threads']} torch threads), run in {t['python']}")
    lines += [f"- times: median of {n_samples} samples ({args.rounds} interleaved rounds x "
              f"{args.repeats}) after warm-up, wall clock with jax.block_until_ready; "
              "speed-up = torchvision time / our time, same run"]
    if reference:
        lines.append(f"- pure-jnp reference: median of {args.reference_repeats} runs in a child "
                     "process (memory-limited; OOM/timeout reported as such)")
    lines.append("")
    if checks:
        lines.append("Check vs torchvision before timing: " + "; ".join(
            f"{layout}: " + ", ".join(f"{k} {s}" for k, s in rep.items())
            for layout, rep in checks.items()))
        lines.append("")
    lines += [table, ""]
    if verdicts:
        lines += ["Targets (the issue: forward >= 10x, forward+backward >= 8x torchvision CPU):", ""]
        lines += [f"- {s}" for s in verdicts] + [""]
    if breakdown_text:
        lines += [breakdown_text, ""]
    for mode, r in reference.items():
        if "samples" not in r:
            lines.append(f"- reference {mode}, full workload: {r['status']} ({r['detail']})")
    for mode, r in reference_subset.items():
        if "samples" not in r:
            lines.append(f"- reference {mode}, first {subset} rois: {r['status']} ({r['detail']})")
    markdown = "\n".join(lines).rstrip() + "\n"
    print()
    print(markdown)

    paths = []
    if args.save:
        os.makedirs(args.results_dir, exist_ok=True)
        stem = os.path.join(args.results_dir, f"cpu-{info['date']}")
        args.markdown = args.markdown or stem + ".md"
        args.json = args.json or stem + ".json"
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown)
        paths.append(args.markdown)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(_timing.to_json(info) + "\n")
        paths.append(args.json)
    for p in paths:
        print(f"wrote {p}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed calls per implementation per round (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls in round 1")
    parser.add_argument("--seed", type=int, default=None, help="workload seed")
    parser.add_argument("--torch-python", default=default_torch_python(),
                        help="python with torch + torchvision (default: "
                             ".venv-torch/bin/python if present, else this python)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads in the worker (default: torch's choice)")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-reference", action="store_true",
                        help="skip the pure-jnp fallback")
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--reference-subset-rois", type=int, default=64,
                        help="if the fallback fails on the full workload, also time it on this "
                             "many rois and scale the time up (0: don't; default 64)")
    parser.add_argument("--reference-timeout", type=float, default=300.0,
                        help="seconds per fallback mode (default 300)")
    parser.add_argument("--reference-mem-gb", type=float, default=None,
                        help="address-space limit of the fallback child (default: "
                             "min(12, 0.6 * available) GiB)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the backward pass alone and XLA's cost of writing "
                             "output-sized buffers")
    parser.add_argument("--malloc-hugetlb", action="store_true",
                        help="rerun with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (for us, the "
                             "torchvision worker and the children alike): large buffers get "
                             "transparent huge pages, so fresh outputs fault in 2 MiB pages")
    parser.add_argument("--save", action="store_true",
                        help="write benchmarks/results/cpu-<date>.md and .json")
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--markdown", default=None, help="also write the markdown here")
    parser.add_argument("--json", default=None, help="also write all data as JSON here")
    parser.add_argument("--child-reference", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--child-mem", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-rois", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seed is None:
        from _workloads import SEED

        args.seed = SEED
    if args.malloc_hugetlb and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
        tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"),
                                        "glibc.malloc.hugetlb=1") if t)
        os.environ["GLIBC_TUNABLES"] = tunables
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
    if args.child_reference:
        _child_reference(args.data, args.child_reference, args.warmup, args.repeats,
                         args.child_mem, args.child_rois)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
