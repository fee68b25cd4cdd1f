"""Registration of the native kernels (XLA FFI targets) and their lowerings.

``_cpu`` is always built; ``_cuda`` only where nvcc was found at build time,
and is imported only here, so CPU-only installs never touch CUDA.
"""

from __future__ import annotations

import importlib
import math
import os

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import mlir

from . import _checks, _primitives

# Custom-call targets of the kernels (the same names on CPU and CUDA). Modules
# that use them are only accepted by jax.export with these targets' safety
# checks disabled (see jax_roipool.export_safety_checks).
FFI_TARGETS = ("roipool_forward", "roipool_gather", "roipool_scatter")
LAYOUT_CODES = {"NHWC": 0, "NCHW": 1}  # roipool::Layout
BIN_CODES = {"fast_rcnn": 0, "partition": 1, _checks.FAST_RCNN_BINARY16: 2}  # roipool::Bins
# Builds of the CPU pooling loops, narrowest first (roipool::Isa). The
# kernels use the widest the CPU runs; JAX_ROIPOOL_CPU_ISA caps it.
CPU_ISAS = ("baseline", "avx2", "avx512")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def _load(module_name: str):
    module = importlib.import_module(f"jax_roipool.{module_name}")
    built, running = module.build_jaxlib_version(), jaxlib.__version__
    if _version_tuple(built) > _version_tuple(running):
        raise ImportError(
            f"jax_roipool.{module_name} was built against the XLA FFI headers of jaxlib {built} "
            f"but jaxlib {running} is running; XLA refuses handlers built with newer headers. "
            "Rebuild it against the installed jax: from the source checkout, "
            "pip install --no-build-isolation -e .")
    return module


def _check_cpu_isa_cap() -> None:
    # Checked here: the kernels read the variable at their first call, where
    # they cannot raise.
    cap = os.environ.get("JAX_ROIPOOL_CPU_ISA")
    if cap and cap not in CPU_ISAS:
        raise ValueError(f"JAX_ROIPOOL_CPU_ISA={cap!r}: expected one of {CPU_ISAS}, or unset")


def _pool_attrs(pooled, spatial_scale, layout, bins):
    """The kernels' attributes."""
    return dict(pooled_h=np.int32(pooled[0]), pooled_w=np.int32(pooled[1]),
                spatial_scale=np.float64(spatial_scale), layout=np.int32(LAYOUT_CODES[layout]),
                bins=np.int32(BIN_CODES[bins]))


# Features of this many bytes or more are pooled with their RoIs in
# roi_order rather than in their own order, per platform and kernel. A
# detector's RoIs may come in any order of their images (sorted by score
# across a batch, say): features larger than the caches would then be read
# from memory again for nearly every RoI, while in image order each image's
# features can stay in cache while its RoIs are pooled. On the CPU (2 cores,
# 32 MiB of L3; benchmarks/bench_roi_order.py, results/roi-order-cpu-*.md)
# sorting paid the forward from 28 MB of features on (1.1-1.4x; 111 MB:
# 1.2x NCHW, 2.4x NHWC), while at 7 and 14 MB the NCHW forward lost (0.8-0.9x).
# The backward (the scatter, whose workers each add into their own
# feature-sized accumulator) gained at every size: 1.1-1.4x at 7 MB,
# 1.2-1.6x at 14 MB, 1.4-2.2x above, with the sort. The gather writes
# pooled outputs as the forward does. The CUDA
# threshold is reasoned from the 50 MB L2 of an H100, not yet measured
# (bench_gpu.py times both orders).
SORT_ROIS_FROM_FEATURE_BYTES = {
    "cpu": {"roipool_forward": 16 * 2**20, "roipool_gather": 16 * 2**20, "roipool_scatter": 0},
    "cuda": dict.fromkeys(FFI_TARGETS, 32 * 2**20),
}


def roi_order(rois: jax.Array) -> jax.Array:
    """The order in which the kernels pool large problems' ``[R, 5]`` rois:
    by image (the batch index truncated, as the kernels take it), then top to
    bottom (by y1 + y2), as int32 indices."""
    return jnp.lexsort((rois[:, 2] + rois[:, 4], jnp.trunc(rois[:, 0]))).astype(np.int32)


def _sorts_rois(platform: str, target: str, features, rois) -> bool:
    """Whether the lowering of kernel ``target`` for ``platform`` pools in
    roi_order (also for symbolic sizes, which may be large)."""
    if not _checks.is_static(*features.shape, rois.shape[0]):
        return True
    nbytes = math.prod(features.shape) * np.dtype(features.dtype).itemsize
    return rois.shape[0] > 1 and nbytes >= SORT_ROIS_FROM_FEATURE_BYTES[platform][target]


def _ffi_lowering(target: str, platform: str):
    """Lowering of a flat primitive to the kernel ``target`` on ``platform``:
    forward (features, rois), gather (source, features, rois) or scatter
    (cotangent, features, rois), each with the pooling order as a last
    operand, ``roi_order(rois)`` or an empty one (the RoIs' own order). Gather
    and scatter recompute the argmax from features and rois. The forward's
    with_argmax is conveyed by the argmax result's shape (empty when False),
    as is the number of copies of the images a gather's source or a
    scatter's gradient holds."""

    def lowering(ctx, *operands, with_argmax=None, copies=None, **config):
        features, rois = ctx.avals_in[-2:]
        if _sorts_rois(platform, target, features, rois):
            order_aval = jax.core.ShapedArray(rois.shape[:1], np.int32)
            order_ctx = ctx.replace(avals_in=[_primitives.plain_aval(rois)],
                                    avals_out=[order_aval])
            (order,) = mlir.lower_fun(roi_order, multiple_results=False)(order_ctx,
                                                                         operands[-1])
        else:
            order_aval = jax.core.ShapedArray((0,), np.int32)
            order = mlir.ir_constant(np.zeros((0,), np.int32))
        ctx = ctx.replace(avals_in=[*ctx.avals_in, order_aval])
        return jax.ffi.ffi_lowering(target)(ctx, *operands, order, **_pool_attrs(**config))

    return lowering


# The CUDA scatter adds 16-bit cotangents atomically into a float32 gradient
# (see accumulator_type in csrc/roipool_ffi.h), converted once afterwards, as
# the CPU kernel rounds its float32 sums once.
_SUMMED_IN_FLOAT32 = frozenset(map(np.dtype, (jnp.float16, jnp.bfloat16)))


def _summing_16_bit_in_float32(scatter_lowering):
    """A scatter lowering whose 16-bit gradients the kernel sums in float32."""

    def lowering(ctx, *operands, **config):
        (grad_aval,) = ctx.avals_out
        if np.dtype(grad_aval.dtype) not in _SUMMED_IN_FLOAT32:
            return scatter_lowering(ctx, *operands, **config)
        acc_ctx = ctx.replace(avals_out=[grad_aval.update(dtype=np.dtype(np.float32))])
        (total,) = scatter_lowering(acc_ctx, *operands, **config)
        return [stablehlo.convert(mlir.aval_to_ir_type(ctx.module_context, grad_aval), total)]

    return lowering


CPU_LOWERINGS = {target: _ffi_lowering(target, "cpu") for target in FFI_TARGETS}
CUDA_LOWERINGS = {target: _ffi_lowering(target, "cuda") for target in FFI_TARGETS}
CUDA_LOWERINGS["roipool_scatter"] = _summing_16_bit_in_float32(CUDA_LOWERINGS["roipool_scatter"])


def _register(module, xla_platform: str, lowering_platform: str, lowerings: dict) -> None:
    registrations = module.registrations()
    assert set(registrations) == set(FFI_TARGETS), sorted(registrations)
    for name, capsule in registrations.items():
        jax.ffi.register_ffi_target(name, capsule, platform=xla_platform)
    # The flat primitives; the per-image ones are lowered through them.
    for primitive, target in zip(_primitives.FLAT[:3], FFI_TARGETS):
        mlir.register_lowering(primitive, lowerings[target], platform=lowering_platform)


def _cuda_module():
    try:
        return _load("_cuda")
    except ModuleNotFoundError as err:  # built without nvcc
        if err.name != "jax_roipool._cuda":
            raise
        return None


_check_cpu_isa_cap()
_register(_load("_cpu"), "cpu", "cpu", CPU_LOWERINGS)
cuda = _cuda_module()
if cuda is not None:
    _register(cuda, "CUDA", "cuda", CUDA_LOWERINGS)
