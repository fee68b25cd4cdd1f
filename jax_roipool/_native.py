"""Registration of the native kernels (XLA FFI targets) and their lowerings.

``_cpu`` is always built; ``_cuda`` only where nvcc was found at build time,
and is imported only here, so CPU-only installs never touch CUDA.
"""

from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import mlir

from . import _primitives

# Custom-call targets of the kernels (the same names on CPU and CUDA). Modules
# that use them are only accepted by jax.export with these targets' safety
# checks disabled (see jax_roipool.export_safety_checks).
FFI_TARGETS = ("roipool_forward", "roipool_gather", "roipool_scatter")
LAYOUT_CODES = {"NHWC": 0, "NCHW": 1}  # roipool::Layout
BIN_CODES = {"fast_rcnn": 0, "partition": 1}  # roipool::Bins
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
            "Rebuild against the installed jax: pip install --no-build-isolation --force-reinstall .")
    return module


def _check_cpu_isa_cap() -> None:
    # Checked here: the kernels read the variable at their first call, where
    # they cannot raise.
    cap = os.environ.get("JAX_ROIPOOL_CPU_ISA")
    if cap and cap not in CPU_ISAS:
        raise ValueError(f"JAX_ROIPOOL_CPU_ISA={cap!r}: expected one of {CPU_ISAS}, or unset")


def _pool_attrs(pooled, spatial_scale, layout, bins):
    return dict(pooled_h=np.int32(pooled[0]), pooled_w=np.int32(pooled[1]),
                spatial_scale=np.float64(spatial_scale), layout=np.int32(LAYOUT_CODES[layout]),
                bins=np.int32(BIN_CODES[bins]))


def _forward_lowering(ctx, features, rois, *, with_argmax, **config):
    # with_argmax is conveyed by the argmax result's shape (empty when False).
    return jax.ffi.ffi_lowering("roipool_forward")(ctx, features, rois, **_pool_attrs(**config))


def _argmax_op_lowering(target: str):
    """Lowering of gather (source, features, rois) or scatter (cotangent,
    features, rois): the kernels recompute the argmax from features and rois."""

    def lowering(ctx, value, features, rois, **config):
        return jax.ffi.ffi_lowering(target)(ctx, value, features, rois, **_pool_attrs(**config))

    return lowering


# The CUDA scatter adds 16-bit cotangents atomically into a float32 gradient
# (see accumulator_type in csrc/roipool_ffi.h), converted once afterwards, as
# the CPU kernel rounds its float32 sums once.
_SUMMED_IN_FLOAT32 = frozenset(map(np.dtype, (jnp.float16, jnp.bfloat16)))


_scatter_lowering = _argmax_op_lowering("roipool_scatter")


def _cuda_scatter_lowering(ctx, cotangent, features, rois, **config):
    (grad_aval,) = ctx.avals_out
    if np.dtype(grad_aval.dtype) not in _SUMMED_IN_FLOAT32:
        return _scatter_lowering(ctx, cotangent, features, rois, **config)
    acc_ctx = ctx.replace(avals_out=[grad_aval.update(dtype=np.dtype(np.float32))])
    (total,) = _scatter_lowering(acc_ctx, cotangent, features, rois, **config)
    return [stablehlo.convert(mlir.aval_to_ir_type(ctx.module_context, grad_aval), total)]


def _register(module, xla_platform: str, lowering_platform: str, scatter_lowering) -> None:
    registrations = module.registrations()
    assert set(registrations) == set(FFI_TARGETS), sorted(registrations)
    for name, capsule in registrations.items():
        jax.ffi.register_ffi_target(name, capsule, platform=xla_platform)
    # The flat primitives; the per-image ones are lowered through them.
    mlir.register_lowering(_primitives.roi_pool_p, _forward_lowering, platform=lowering_platform)
    mlir.register_lowering(_primitives.gather_p, _argmax_op_lowering("roipool_gather"),
                           platform=lowering_platform)
    mlir.register_lowering(_primitives.scatter_p, scatter_lowering, platform=lowering_platform)


def _cuda_module():
    try:
        return _load("_cuda")
    except ModuleNotFoundError as err:  # built without nvcc
        if err.name != "jax_roipool._cuda":
            raise
        return None


_check_cpu_isa_cap()
_register(_load("_cpu"), "cpu", "cpu", _scatter_lowering)
cuda = _cuda_module()
if cuda is not None:
    _register(cuda, "CUDA", "cuda", _cuda_scatter_lowering)
