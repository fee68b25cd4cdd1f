"""The CUDA kernel body (cuda/roipool_kernels.cuh), run on the host, against the CPU kernels.

No GPU needed: tests/cuda_host/emulate_kernel.cc compiles the kernel with the
host C++ compiler and the CUDA toolkit's headers and runs the threads of a
small grid one after another. This checks everything the kernel computes (bins,
ties, NaN, invalid RoIs, 16-bit types, both layouts, the scatter's
accumulator type) on every CI run; what it cannot check (the launch,
atomics, the FFI handlers on a device) is tests/test_gpu.py's.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
from jax_roipool import _checks, _native
from jax_roipool._primitives import gather_p, scatter_p
from conftest import (BINS, DTYPES, HOST_CXX, LAYOUTS, SCALES, adversarial_rois,
                      assert_bitwise, assert_exact, dtype_id, every_16bit_value, feature_shape,
                      random_features, random_rois, x64_for)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPS = {"forward": 0, "gather": 1, "scatter": 2}  # roipool::Op
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
# What a forward's or gather's results hold before the kernel runs: XLA's
# result buffers are not zeroed, so the kernel must write every element
# (1000 is exact in every dtype and far from any test's values).
UNWRITTEN, UNWRITTEN_CELL = 1000, -2


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include directory, as nvcc itself reports it."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
                         capture_output=True, text=True)
    for include in re.findall(r'INCLUDES="-I([^"]+)"', dry.stdout + dry.stderr):
        include = include.strip()
        if os.path.exists(os.path.join(include, "cuda_fp16.h")):
            return include
    return None


pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None or HOST_CXX is None,
    reason="no CUDA toolkit (nvcc) or host C++ compiler to build the CUDA kernel for the host")


# Both builds of the kernel: one thread per output element (the default) and
# four channels per thread (CMake JAX_ROIPOOL_CUDA_CHANNELS_PER_THREAD=4).
@pytest.fixture(scope="module", params=[1, 4], ids=lambda n: f"{n}-channels-per-thread")
def kernel(request, tmp_path_factory):
    include = cuda_include_dir()
    assert include, "nvcc is on PATH, but `nvcc --dryrun` names no include dir with cuda_fp16.h"
    library = str(tmp_path_factory.mktemp("cuda_host") / "emulate_kernel.so")
    subprocess.run([HOST_CXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-w",
                    f"-DROIPOOL_CHANNELS_PER_THREAD={request.param}",
                    "-I", os.path.join(ROOT, "csrc"), "-I", os.path.join(ROOT, "cuda"),
                    "-I", include, os.path.join(HERE, "cuda_host", "emulate_kernel.cc"),
                    "-o", library], check=True)
    lib = ctypes.CDLL(library)
    fn = lib.emulate_pool_kernel
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_int32] * 8 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                                           ctypes.c_int32, ctypes.c_double]
                   + [ctypes.c_void_p] * 6)
    lib.channels_per_thread = request.param
    lib.pool_grid.restype = None
    lib.pool_grid.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32,
                              ctypes.POINTER(ctypes.c_int64)]
    return lib


@pytest.mark.parametrize("rois, c, pooled", [
    (0, 256, (7, 7)), (1, 1, (1, 1)), (1, 4, (8, 8)), (1, 4, (8, 9)), (1024, 256, (7, 7)),
    (8192, 512, (7, 7)), (2**21, 1024, (32, 32)), (2**31 - 1, 4, (1, 1)), (2**31, 8, (1, 1)),
    (3 * 2**40 + 1, 4, (1, 1))])
def test_launch_grid_covers_every_task_once(kernel, rois, c, pooled):
    grid = (ctypes.c_int64 * 3)()
    kernel.pool_grid(rois, c, pooled[0], pooled[1], grid)
    tasks, per_block, blocks = list(grid)
    assert tasks == rois * pooled[0] * pooled[1] * -(-c // kernel.channels_per_thread)
    if tasks == 0:
        assert blocks == 0
        return
    assert per_block % 256 == 0  # whole blocks of threads
    # kChunksPerBlock (8) chunks per block, more only where the grid would
    # exceed its x extent (kMaxBlocks).
    if tasks <= (2**31 - 1) * 8 * 256:
        assert per_block == 8 * 256
    else:
        assert per_block > 8 * 256 and blocks > (2**31 - 1) // 2
    assert 1 <= blocks <= 2**31 - 1
    assert (blocks - 1) * per_block < tasks <= blocks * per_block  # no block idle


def emulate(kernel, op, features, rois, value, pooled, scale, layout, bins, order=None,
            with_argmax=True, copies=1):
    """The kernel's results as numpy arrays: (out, argmax) for the forward
    (argmax None, and a null pointer to the kernel, without ``with_argmax``),
    out for gather, the (float32 for 16-bit) accumulator for scatter; RoIs
    pooled in ``order`` (int32 indices) or their own. A gather's source (a
    scatter's gradient) holds ``copies`` copies of the images, copy-major.
    The forward's and gather's results start as UNWRITTEN; the scatter's
    accumulator as zeros, as the CUDA handler zeroes it. The order is followed
    in memory by more RoI indices (0), which the kernel must not read."""
    n, h, w, c = (features.shape if layout == "NHWC" else
                  (features.shape[0], features.shape[2], features.shape[3], features.shape[1]))
    pooled_shape = feature_shape(len(rois), pooled[0], pooled[1], c, layout)
    dtype = np.dtype(features.dtype)
    if op == "scatter":
        out = np.zeros((n * copies,) + features.shape[1:],
                       np.float64 if dtype == np.float64 else np.float32)
    else:
        out = np.full(pooled_shape, UNWRITTEN, dtype)
    argmax = (np.full(pooled_shape, UNWRITTEN_CELL, np.int32)
              if op == "forward" and with_argmax else None)
    features, rois = np.ascontiguousarray(features), np.ascontiguousarray(rois)
    value = None if value is None else np.ascontiguousarray(value)
    if order is not None:
        # Followed by RoI indices, so that a thread past the last task that
        # read the order past its end would pool a RoI again.
        order = np.concatenate([order, np.zeros(len(order), np.int32)]).astype(np.int32)
    pointer = lambda a: None if a is None else a.ctypes.data  # noqa: E731
    status = kernel.emulate_pool_kernel(
        OPS[op], LAYOUTS.index(layout), _native.BIN_CODES[bins], DTYPE_CODES[dtype.name], n,
        copies, h, w, c, len(rois), pooled[0], pooled[1], scale,
        pointer(features), pointer(rois), pointer(order), pointer(value), pointer(out),
        pointer(argmax))
    assert status == 0
    return (out, argmax) if op == "forward" else out


def case(seed, dtype, layout):
    """A random map (ties, NaN and -inf in some seeds) and random plus adversarial rois."""
    rng = np.random.default_rng(seed)
    n, h, w = int(rng.integers(1, 4)), int(rng.integers(1, 26)), int(rng.integers(1, 26))
    c = int(rng.choice([1, 3, 16, 33]))
    scale = SCALES[seed % len(SCALES)]
    features = random_features(rng, feature_shape(n, h, w, c, layout), dtype,
                               ("normal", "ties")[seed % 2])
    if seed % 3 == 2:
        flat = features.reshape(-1)
        flat[rng.choice(flat.size, max(1, flat.size // 20), replace=False)] = np.nan
        flat[rng.choice(flat.size, max(1, flat.size // 20), replace=False)] = -np.inf
    rois_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rois = np.concatenate([random_rois(rng, n, h, w, int(rng.integers(0, 80)), scale),
                           adversarial_rois(n, h, w, scale)]).astype(rois_dtype)
    pooled = (int(rng.integers(1, 9)), int(rng.integers(1, 9)))
    return rng, features, rois, pooled, scale


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_kernel_matches_cpu(kernel, dtype, layout, bins, seed):
    rng, features, rois, pooled, scale = case(seed, dtype, layout)
    config = dict(output_size=pooled, spatial_scale=scale, layout=layout, bins=bins)
    source = random_features(rng, features.shape, dtype)
    out_shape = feature_shape(len(rois), pooled[0], pooled[1], features.shape[-1]
                              if layout == "NHWC" else features.shape[1], layout)
    cotangent = rng.integers(-2, 3, out_shape).astype(dtype)  # sums exact in any order

    with x64_for(dtype):
        want_out, want_arg = jrp.roi_pool_with_argmax(features, rois, **config)
        want_gather = jax.jvp(lambda x: jrp.roi_pool(x, rois, **config), (features,),
                              (source,))[1]
        want_grad = jax.vjp(lambda x: jrp.roi_pool(x, rois, **config), features)[1](
            cotangent)[0]

    out, arg = emulate(kernel, "forward", features, rois, None, pooled, scale, layout, bins)
    assert_bitwise(out, want_out, "forward output")
    assert_exact(arg, np.asarray(want_arg), "forward argmax")
    out, _ = emulate(kernel, "forward", features, rois, None, pooled, scale, layout, bins,
                     with_argmax=False)
    assert_bitwise(out, want_out, "forward output without argmax")
    gathered = emulate(kernel, "gather", features, rois, source, pooled, scale, layout, bins)
    assert_bitwise(gathered, want_gather, "gather")
    accumulator = emulate(kernel, "scatter", features, rois, cotangent, pooled, scale, layout,
                          bins)
    # 16-bit gradients come out of the kernel in float32; the CUDA lowering
    # converts them (round to nearest even, as numpy's astype).
    assert_bitwise(accumulator.astype(features.dtype), want_grad, "scatter")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=dtype_id)
def test_cuda_kernel_copies_16_bit_values_bit_exactly(kernel, dtype, layout):
    # One cell per bin: each output is its cell, bit for bit, NaN payloads
    # and signalling NaNs included (assert_bitwise would take any NaN), as
    # the kernel stores the chosen element itself rather than its float.
    features = every_16bit_value(dtype, layout)
    rois = np.array([[0, 0, 0, 3, 3]], np.float32)
    out, _ = emulate(kernel, "forward", features, rois, None, (4, 4), 1.0, layout, "fast_rcnn")
    assert_exact(out.view(np.uint16), features.view(np.uint16), "forward bits")
    gathered = emulate(kernel, "gather", features, rois, features, (4, 4), 1.0, layout,
                       "fast_rcnn")
    assert_exact(gathered.view(np.uint16), features.view(np.uint16), "gather bits")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_kernel_float16_rois_geometry(kernel, layout, seed):
    # float16 rois reach the kernels upcast, with their float16 geometry
    # (torchvision's) as the bins mode and the scale rounded to float16.
    _, features, rois, pooled, scale = case(seed, np.float32, layout)
    with np.errstate(over="ignore"):
        rois = rois.astype(np.float16)
    want_out, want_arg = jrp.roi_pool_with_argmax(features, rois, pooled, scale, layout=layout)
    out, arg = emulate(kernel, "forward", features, rois.astype(np.float32), None, pooled,
                       _checks._binary16_scale(scale), layout, _checks.FAST_RCNN_BINARY16)
    assert_bitwise(out, want_out, "forward output")
    assert_exact(arg, np.asarray(want_arg), "forward argmax")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pooling_order_changes_no_result(kernel, layout):
    # The CUDA lowering has large problems pooled in roi_order: any order of
    # the RoIs must give each RoI's own results, in its own place.
    rng, features, rois, pooled, scale = case(4, np.float32, layout)
    order = np.asarray(_native.roi_order(jnp.asarray(rois)))
    assert sorted(order.tolist()) == list(range(len(rois)))
    assert (order != np.arange(len(rois))).any()
    source = random_features(rng, features.shape, np.float32)
    out_shape = feature_shape(len(rois), pooled[0], pooled[1], features.shape[-1]
                              if layout == "NHWC" else features.shape[1], layout)
    cotangent = rng.integers(-2, 3, out_shape).astype(np.float32)
    args = (pooled, scale, layout, "fast_rcnn")
    want_out, want_arg = emulate(kernel, "forward", features, rois, None, *args)
    out, arg = emulate(kernel, "forward", features, rois, None, *args, order=order)
    assert_bitwise(out, want_out, "forward output in roi_order")
    assert_exact(arg, want_arg, "forward argmax in roi_order")
    for op, value in (("gather", source), ("scatter", cotangent)):
        assert_bitwise(emulate(kernel, op, features, rois, value, *args, order=order),
                       emulate(kernel, op, features, rois, value, *args), f"{op} in roi_order")

    # Only a hand-written custom call can pass entries outside [0, R): they
    # are skipped, so the RoIs they displaced are never pooled (their results
    # keep what they held) and nothing is read or written out of bounds.
    bad = order.copy()
    bad[:2] = [-1, len(rois)]
    skipped = np.isin(np.arange(len(rois)), order[:2])
    out, arg = emulate(kernel, "forward", features, rois, None, *args, order=bad)
    assert (out[skipped] == UNWRITTEN).all() and (arg[skipped] == UNWRITTEN_CELL).all()
    assert_bitwise(out[~skipped], want_out[~skipped], "forward output, other RoIs")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=dtype_id)
def test_cuda_kernel_copies_of_the_images_match_cpu(kernel, dtype, layout):
    # A gather's source or a scatter's gradient holding copies of the images
    # (a vmap over tangents or cotangents alone): RoIs name images of the
    # copies, batch indices out of their range included.
    rng, features, rois, pooled, scale = case(5, dtype, layout)
    n, copies = features.shape[0], 3
    rois[:, 0] = rng.integers(-1, n * copies + 1, len(rois))
    source = random_features(rng, (n * copies,) + features.shape[1:], dtype)
    out_shape = feature_shape(len(rois), pooled[0], pooled[1], features.shape[-1]
                              if layout == "NHWC" else features.shape[1], layout)
    cotangent = rng.integers(-2, 3, out_shape).astype(dtype)
    config = dict(pooled=pooled, spatial_scale=scale, layout=layout, bins="fast_rcnn",
                  copies=copies)
    args = (pooled, scale, layout, "fast_rcnn")
    copied = dict(copies=copies)
    features_, rois_ = jnp.asarray(features), jnp.asarray(rois)
    want = gather_p.bind(jnp.asarray(source), features_, rois_, **config)
    assert np.asarray(want, np.float32).any()
    assert_bitwise(emulate(kernel, "gather", features, rois, source, *args, **copied), want,
                   "gather")
    want = scatter_p.bind(jnp.asarray(cotangent), features_, rois_, **config)
    assert want.shape == source.shape and np.asarray(want, np.float32).any()
    got = emulate(kernel, "scatter", features, rois, cotangent, *args, **copied)
    assert_bitwise(got.astype(dtype), want, "scatter")


def test_scatter_accumulates_16_bit_sums_in_float32(kernel):
    # One cell is the maximum of 300 bins: in bfloat16 a running sum of ones
    # would stop at 256 (256 + 1 rounds to 256); the float32 accumulator does not.
    features = np.zeros((1, 4, 4, 2), jnp.bfloat16)
    features[0, 1, 2] = 5
    rois = np.tile(np.array([[0, 0, 0, 3, 3]], np.float32), (300, 1))
    cotangent = np.ones((300, 1, 1, 2), jnp.bfloat16)
    accumulator = emulate(kernel, "scatter", features, rois, cotangent, (1, 1), 1.0, "NHWC",
                          "fast_rcnn")
    assert accumulator[0, 1, 2].tolist() == [300.0, 300.0]
    assert np.count_nonzero(accumulator) == 2
