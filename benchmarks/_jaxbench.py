"""jax_roipool side of the benchmarks: jitted callables on fixed device arrays."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from typing import Any, Callable

import jax
import numpy as np

import jax_roipool
from jax_roipool import _native, reference

NATIVE_TARGETS = ("roipool_forward", "roipool_scatter")


@contextlib.contextmanager
def roi_order_forced(platform: str, on: bool):
    """While tracing: the pooling order of every kernel's lowering for
    ``platform`` ("cpu" or "cuda") forced to roi_order (on) or the RoIs' own
    (off)."""
    thresholds = _native.SORT_ROIS_FROM_FEATURE_BYTES
    saved = thresholds[platform]
    thresholds[platform] = dict.fromkeys(saved, 0 if on else float("inf"))
    try:
        yield
    finally:
        thresholds[platform] = saved


def sorts_by_default(platform: str, feature_bytes: int, target: str = "roipool_forward") -> bool:
    """Whether the lowering of kernel ``target`` for ``platform`` pools
    features this large in roi_order."""
    return feature_bytes >= _native.SORT_ROIS_FROM_FEATURE_BYTES[platform][target]


def source_commit() -> str | None:
    """The commit of the checkout the benchmarks run from ("-dirty" with
    uncommitted changes to tracked files), or None outside a git checkout.
    It names the kernels' source only if the extension was built from this
    checkout (as ``pip install -e .`` does)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--exclude=*"],
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict[str, str]:
    import jaxlib

    from jax_roipool import _cpu, _native

    version = getattr(jax_roipool, "__version__", "?")
    commit = source_commit()
    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "jax_roipool": f"{version}+g{commit}" if commit else version,
           "numpy": np.__version__, "cpu_kernels": _cpu.cpu_isa()}
    if _native.cuda is not None:
        out["cuda_channels_per_thread"] = str(_native.cuda.channels_per_thread())
    try:
        dev = jax.devices()[0]
        out["jax_backend"] = jax.default_backend()
        out["jax_device"] = f"{dev.platform}:{dev.device_kind}"
    except Exception as e:  # pragma: no cover - reported, not fatal
        out["jax_backend"] = f"error: {e}"
    return out


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """[N, C, H, W] / [R, C, PH, PW] -> channels last."""
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))


class JaxRoiPool:
    """jitted forward / forward+backward of one implementation on one layout.

    ``impl``: "native" (jax_roipool.roi_pool, the custom primitive) or
    "reference" (jax_roipool.reference.roi_pool, pure jax.numpy, autodiffed by
    JAX itself). Inputs are the NCHW arrays of ``_workloads.make_arrays``; they
    are transposed for NHWC (outside the timed region) and put on ``device``.
    """

    def __init__(self, arrays: dict[str, np.ndarray], layout: str, impl: str = "native",
                 device: Any = None):
        assert layout in ("NHWC", "NCHW") and impl in ("native", "reference")
        self.layout, self.impl = layout, impl
        features, cot = arrays["features"], arrays.get("cotangent")
        if layout == "NHWC":
            features = to_nhwc(features)
            cot = None if cot is None else to_nhwc(cot)
        device = device or jax.devices()[0]
        self.features = jax.device_put(features, device)
        self.rois = jax.device_put(arrays["rois"], device)
        self.cotangent = None if cot is None else jax.device_put(cot, device)
        output_size = tuple(int(s) for s in arrays["output_size"])
        scale = float(arrays["spatial_scale"])
        pool = jax_roipool.roi_pool if impl == "native" else reference.roi_pool

        def fwd(x, rois):
            return pool(x, rois, output_size, scale, layout=layout)

        def fwd_bwd(x, rois, cot):
            y, vjp = jax.vjp(lambda f: fwd(f, rois), x)
            return y, vjp(cot)[0]

        self._fwd, self._fwd_bwd = jax.jit(fwd), jax.jit(fwd_bwd)
        self._argmax = jax.jit(lambda x, rois: jax_roipool.roi_pool_with_argmax(
            x, rois, output_size, scale, layout=layout)[1])

        # Backward only: the vjp closure (holding the forward's residuals, e.g.
        # the argmax) applied to the cotangent.
        self._bwd = jax.jit(lambda vjp_fn, cot: vjp_fn(cot)[0])
        self._vjp_fn = None

    def backward(self):
        """The backward pass alone (residuals computed once, outside the timing)."""
        if self._vjp_fn is None:
            rois = self.rois
            _, self._vjp_fn = jax.vjp(lambda f: self._fwd(f, rois), self.features)
        return self._bwd(self._vjp_fn, self.cotangent)

    # Zero-argument calls for _timing.measure.
    def forward(self):
        return self._fwd(self.features, self.rois)

    def forward_backward(self):
        return self._fwd_bwd(self.features, self.rois, self.cotangent)

    def call(self, mode: str) -> Callable[[], Any]:
        return {"forward": self.forward, "forward_backward": self.forward_backward,
                "backward": self.backward}[mode]

    @staticmethod
    def sync(result):
        return jax.block_until_ready(result)

    def results(self) -> dict[str, np.ndarray]:
        """output, argmax (ours: flat cell index), grad_features (if there is a cotangent).

        All as NCHW numpy arrays.
        """
        if self.cotangent is None:
            arrays = {"output": np.asarray(self.forward())}
        else:
            out, grad = (np.asarray(a) for a in self.forward_backward())
            arrays = {"output": out, "grad_features": grad}
        if self.impl == "native":
            arrays["argmax"] = np.asarray(self._argmax(self.features, self.rois))
        if self.layout == "NHWC":
            arrays = {k: to_nchw(v) for k, v in arrays.items()}
        return arrays

    def custom_call_targets(self, mode: str = "forward_backward") -> set[str]:
        """Custom-call targets in the lowered StableHLO (to prove the native kernels run)."""
        if self.cotangent is None:
            mode = "forward"
        fn = self._fwd_bwd if mode == "forward_backward" else self._fwd
        args = ((self.features, self.rois, self.cotangent) if mode == "forward_backward"
                else (self.features, self.rois))
        text = fn.lower(*args).as_text()
        return set(re.findall(r"custom_call\s*@([A-Za-z0-9_]+)", text)) | set(
            re.findall(r'call_target_name\s*=\s*"([A-Za-z0-9_]+)"', text))


def argmax_to_torchvision(argmax: np.ndarray, rois: np.ndarray, h: int, w: int) -> np.ndarray:
    """Our flat (n * H + h) * W + w argmax [R, C, PH, PW] -> torchvision's h * W + w."""
    batch = rois[:, 0].astype(np.int64)[:, None, None, None]
    return np.where(argmax >= 0, argmax - batch * h * w, -1).astype(np.int32)


def compare(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], rois: np.ndarray,
            h: int, w: int) -> dict[str, str]:
    """'bit-exact' or a description of the mismatch, per array."""
    report = {}
    for key in ("output", "argmax", "grad_features"):
        if key not in ours or key not in theirs:
            continue
        a, b = ours[key], theirs[key]
        if key == "argmax":
            a = argmax_to_torchvision(a, rois, h, w)
        if a.shape != b.shape or a.dtype != b.dtype:
            report[key] = f"MISMATCH shape/dtype {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
            continue
        diff = a != b
        if key != "argmax":
            diff &= ~(np.isnan(a) & np.isnan(b))
        if not diff.any():
            report[key] = "bit-exact"
        else:
            extra = ""
            if key != "argmax":
                extra = f", max |diff| {np.max(np.abs(a.astype(np.float64) - b)):.3g}"
            report[key] = f"MISMATCH in {int(diff.sum())}/{diff.size} elements{extra}"
    return report
