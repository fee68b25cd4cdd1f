"""Rounding to binary16, as the geometry of float16 rois needs it (torchvision
computes their bins in float16): to_binary16 in csrc/roipool_geometry.h, built
with the host C++ compiler and checked on every float (tests/cpu_host), and
the pure-JAX reference's own version against numpy's float16 conversion."""

from __future__ import annotations

import os
import subprocess

import numpy as np

from conftest import HOST_CXX
from jax_roipool import reference

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def host_has_f16c() -> bool:
    """x86 CPUs with F16C convert to _Float16 in hardware: the check of all
    2^32 floats takes seconds instead of minutes of software conversion."""
    try:
        with open("/proc/cpuinfo") as f:
            return " f16c" in f.read()
    except OSError:
        return False


def test_kernel_rounding_matches_the_compilers_float16_on_every_float(tmp_path):
    assert HOST_CXX, "no C++ compiler: the package itself needs one to build"
    program = str(tmp_path / "binary16")
    subprocess.run([HOST_CXX, "-std=c++17", "-O2", "-ffp-contract=off",
                    *(["-mf16c"] if host_has_f16c() else []), "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(HERE, "cpu_host", "binary16.cc"), "-o", program], check=True)
    run = subprocess.run([program], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("0 mismatches")


def test_reference_rounding_matches_numpy_float16():
    rng = np.random.default_rng(5)
    edges = np.array([0.0, -0.0, 65504.0, 65519.996, 65520.0, 65536.0, 2.0**-14, 2.0**-25,
                      3 * 2.0**-26, 2.0**-24, 2049.0, 2051.0, -2049.0, np.inf, -np.inf, np.nan],
                     np.float32)
    # Random bit patterns, and every float32 around the binary16 range.
    values = np.concatenate([edges, rng.integers(0, 2**32, 2**21, dtype=np.uint64)
                             .astype(np.uint32).view(np.float32),
                             np.arange(0x33000000, 0x47800000, 97, dtype=np.uint32)
                             .view(np.float32)])
    values = np.concatenate([values, -values])
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).astype(np.float32)
    got = np.asarray(reference._to_binary16(values))
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), values[~same][:10]
