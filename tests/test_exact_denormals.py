"""roipool::ExactDenormals (csrc/roipool_denormals.h), the scope in which the
CPU kernels keep denormals that XLA's runtime flushes, restoring its mode
after: built with the host C++ compiler and run (tests/cpu_host)."""

from __future__ import annotations

import os
import subprocess

from conftest import HOST_CXX

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_scope_keeps_denormals_and_restores_the_mode(tmp_path):
    assert HOST_CXX, "no C++ compiler: the package itself needs one to build"
    program = str(tmp_path / "exact_denormals")
    subprocess.run([HOST_CXX, "-std=c++17", "-O2", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(HERE, "cpu_host", "exact_denormals.cc"), "-o", program],
                   check=True)
    run = subprocess.run([program], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
