"""Every CPU build of the pooling loops that this machine can run.

The CPU kernels pool with the widest instruction set the CPU has (baseline
x86-64, AVX2 or AVX-512; csrc/roipool_cpu.cc, cpu_isa), so the rest of the
suite tests only that build. Here each build runs in a subprocess with
JAX_ROIPOOL_CPU_ISA capping it, on channel counts that reach every register
block size of every build and the per-channel tail, and must match the
float64 loop reference exactly: forward with and without argmax, the
gradient (scatter, both of its splits) and the JVP (gather), all dtypes,
both layouts and bin modes. Builds this CPU cannot run are not tested here
(the AVX-512 one on an AVX2-only machine, for instance).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_loop
from jax_roipool import _cpu
from jax_roipool._native import CPU_ISAS as ISAS  # narrowest first
from conftest import (BINS, DTYPES, LAYOUTS, adversarial_rois, assert_exact, dtype_id,
                      every_16bit_value, feature_shape, random_features, random_rois, x64_for)

HERE = os.path.dirname(os.path.abspath(__file__))
# 5: the per-channel tail alone. 16: one AVX-512 register. 127: AVX-512
# 64 + 3 * 16 + 15; AVX2 3 * 32 + 3 * 8 + 7 (argmax), 64 + 7 * 8 + 7 (without).
CHANNELS = (5, 16, 127)
SMALL_MAP = (2, 9, 11)  # N, H, W
# Features too large for one scatter accumulator per thread (128 MiB in all),
# so the scatter splits the channels between threads: with 2 pool threads
# (this CI machine kind) blocks [0, 2064) and [2064, 4111), the second
# starting mid-map in every build's blocks; other thread counts cut elsewhere.
SPLIT_MAP, SPLIT_CHANNELS = (1, 64, 64), 4111
POOLED = (3, 4)
SCALE = 0.5


def cases():
    """(name, dtype, layout, bins, channels, (N, H, W)) of every case."""
    for dtype in DTYPES:
        for layout in LAYOUTS:
            for bins in BINS:
                for c in CHANNELS:
                    yield f"{dtype_id(dtype)}-{layout}-{bins}-{c}", dtype, layout, bins, c, \
                        SMALL_MAP
    for layout in LAYOUTS:
        yield f"split-{layout}", np.float32, layout, "fast_rcnn", SPLIT_CHANNELS, SPLIT_MAP


def special_values(dtype):
    """Values whose order the folds must get right bit for bit: signed zeros
    (the first of equal values wins), subnormals (the kernels compare them
    exactly, XLA's CPU threads flush them), infinities and NaN."""
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    return np.array([0.0, -0.0, tiny, -tiny, np.inf, -np.inf, np.nan], np.float64).astype(dtype)


def case_arrays(name, dtype, layout, c, map_shape):
    """Features (small integers: many ties, and special_values), rois,
    cotangent (small integers: exact sums) and tangent of a case."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n, h, w = map_shape
    features = random_features(rng, feature_shape(n, h, w, c, layout), dtype, "ties")
    flat = features.reshape(-1)  # a view
    special = rng.choice(flat.size, flat.size // 8, replace=False)
    flat[special] = rng.choice(special_values(dtype), special.size)
    rois = np.concatenate([random_rois(rng, n, h, w, 10, SCALE),
                           adversarial_rois(n, h, w, SCALE)])
    out_shape = ((len(rois),) + POOLED + (c,) if layout == "NHWC"
                 else (len(rois), c) + POOLED)
    cotangent = rng.integers(-3, 4, out_shape).astype(dtype)
    tangent = random_features(rng, features.shape, dtype, "normal")
    return features, rois, cotangent, tangent


def run_cases(path):
    """Worker (in the subprocess): every case's native results, into an .npz at path."""
    import jax_roipool as jrp

    results = {"isa": np.array(_cpu.cpu_isa())}
    for name, dtype, layout, bins, c, map_shape in cases():
        features, rois, cotangent, tangent = case_arrays(name, dtype, layout, c, map_shape)
        with x64_for(dtype):
            pool = functools.partial(jrp.roi_pool, rois=rois, output_size=POOLED,
                                     spatial_scale=SCALE, layout=layout, bins=bins)
            out, arg = jrp.roi_pool_with_argmax(features, rois, POOLED, SCALE, layout=layout,
                                                bins=bins)
            _, vjp = jax.vjp(pool, jnp.asarray(features))
            _, out_dot = jax.jvp(pool, (jnp.asarray(features),), (jnp.asarray(tangent),))
            arrays = {"out": out, "argmax": arg, "maxima": pool(features),
                      "grad": vjp(jnp.asarray(cotangent))[0], "out_dot": out_dot}
        for key, value in arrays.items():  # float64 holds every dtype's values exactly
            value = np.asarray(value)
            results[f"{name}/{key}"] = value if value.dtype == np.int32 else \
                value.astype(np.float64)
    for dtype in BITS_DTYPES:
        for layout in LAYOUTS:
            features = every_16bit_value(dtype, layout)
            # 64 RoIs: every thread of the pool pools (and widens) them. Each
            # covers the 4x4 map, one cell per bin, so the output repeats the
            # features.
            rois = np.tile(np.array([0, 0, 0, 3, 3], np.float32), (64, 1))
            out = jrp.roi_pool(features, rois, 4, layout=layout)
            results[f"bits/{dtype_id(dtype)}/{layout}"] = np.asarray(out).view(np.uint16)
    np.savez(path, **results)


BITS_DTYPES = (jnp.float16, jnp.bfloat16)


def env_capped(cap):
    """This process's environment with JAX_ROIPOOL_CPU_ISA=cap (unset for None),
    on the CPU backend alone (where there is a GPU too)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_ROIPOOL_CPU_ISA"}
    env["JAX_PLATFORMS"] = "cpu"
    if cap is not None:
        env["JAX_ROIPOOL_CPU_ISA"] = cap
    return env


def run_worker(isa, path):
    code = f"import sys; sys.path.insert(0, {HERE!r}); import test_cpu_isa; " \
           f"test_cpu_isa.run_cases({str(path)!r})"
    subprocess.run([sys.executable, "-c", code], env=env_capped(isa), check=True)
    return np.load(path)


@pytest.fixture(scope="module")
def expected():
    """Loop-reference results of every case."""
    want = {}
    for name, dtype, layout, bins, c, map_shape in cases():
        features, rois, cotangent, tangent = case_arrays(name, dtype, layout, c, map_shape)
        out, arg = reference_loop.roi_pool_loop(features, rois, POOLED, SCALE, layout=layout,
                                                bins=bins)
        flat = reference_loop.to_float64(tangent).reshape(-1)
        want[name] = dict(out=out, argmax=arg, maxima=out,
                          grad=reference_loop.scatter_grad(cotangent, arg, features.shape,
                                                           layout=layout),
                          out_dot=gather_at(flat, arg, features.shape, layout))
    return want


def gather_at(tangent_flat, argmax, shape, layout):
    """The tangent at each argmax cell (0 where there is none), float64."""
    if layout == "NHWC":
        c = shape[3]
        index = argmax * c + np.arange(c)
    else:
        _, c, h, w = shape
        plane = h * w
        index = (argmax // plane * c + np.arange(c)[:, None, None]) * plane + argmax % plane
    return np.where(argmax >= 0, tangent_flat[np.maximum(index, 0)], 0.0)


@pytest.mark.parametrize("isa", ISAS[:ISAS.index(_cpu.best_cpu_isa()) + 1])
def test_build_matches_loop_reference(isa, expected, tmp_path):
    got = run_worker(isa, tmp_path / "isa.npz")
    assert str(got["isa"]) == isa, "JAX_ROIPOOL_CPU_ISA did not select the build"
    for name, want in expected.items():
        for key, value in want.items():
            what = f"{isa} {name} {key}"
            assert_exact(got[f"{name}/{key}"], value, what)
            if key in ("out", "maxima"):  # the first of -0.0 and +0.0
                assert np.array_equal(np.signbit(got[f"{name}/{key}"]), np.signbit(value)), what
    for dtype in BITS_DTYPES:  # the max of one cell is that cell, bit for bit
        for layout in LAYOUTS:
            bits = got[f"bits/{dtype_id(dtype)}/{layout}"].reshape(64, -1)
            changed = np.flatnonzero((bits != np.arange(2**16)).any(axis=0))
            assert changed.size == 0, (f"{isa} {dtype_id(dtype)} {layout}: {changed.size} bit "
                                       f"patterns changed, e.g. {hex(changed[0])} -> "
                                       f"{hex(bits[:, changed[0]].max())}")


@pytest.mark.parametrize("cap", [None, *ISAS])
def test_cap_selects_the_build(cap):
    code = "import jax_roipool; from jax_roipool import _cpu; print(_cpu.cpu_isa())"
    used = subprocess.run([sys.executable, "-c", code], env=env_capped(cap), check=True,
                          capture_output=True, text=True).stdout.strip()
    best = _cpu.best_cpu_isa()
    assert used == (best if cap is None else ISAS[min(ISAS.index(cap), ISAS.index(best))])


def test_unknown_isa_name_is_rejected():
    result = subprocess.run([sys.executable, "-c", "import jax_roipool"], env=env_capped("sse9"),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "JAX_ROIPOOL_CPU_ISA" in result.stderr and "sse9" in result.stderr
