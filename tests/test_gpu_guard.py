"""test_gpu.py under JAX_ROIPOOL_REQUIRE_GPU=1 (as gpu_proof.sh runs it): no
usable GPU fails the run instead of skipping every test."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from conftest import gpu_devices


def test_required_gpu_fails_instead_of_skipping():
    tests = pathlib.Path(__file__).parent
    env = dict(os.environ, JAX_ROIPOOL_REQUIRE_GPU="1")
    # -k selects no test: only collection, where the guard runs, has work to do.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-k", "no_test_has_this_name", str(tests / "test_gpu.py")],
        cwd=tests.parent, env=env, capture_output=True, text=True, timeout=300)
    if gpu_devices():
        assert run.returncode == 5, run.stdout + run.stderr  # 5: no test selected
    else:
        assert run.returncode not in (0, 5), run.stdout + run.stderr
        assert "JAX_ROIPOOL_REQUIRE_GPU=1 but jax sees no GPU" in run.stdout + run.stderr
