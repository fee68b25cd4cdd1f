"""Flax NNX layer for RoI max pooling (imports ``flax``; ``import jax_roipool`` does not)."""

from __future__ import annotations

import flax.nnx as nnx
import jax

from ._api import OutputSize, roi_pool
from ._checks import check_config

__all__ = ["RoIPool"]


class RoIPool(nnx.Module):
    """Fast R-CNN RoI max pooling as a parameter-free ``flax.nnx`` module.

    A thin wrapper around :func:`jax_roipool.roi_pool`. The arguments are
    checked when the module is made and kept as static Python values
    (``output_size`` as ``(PH, PW)``, ``spatial_scale`` as a float), so the
    module has an empty ``nnx.state`` and works inside ``nnx.jit`` /
    ``nnx.grad`` models and with plain ``jax`` transforms.

    Args:
      output_size: ``PH`` (square bins) or ``(PH, PW)``.
      spatial_scale: feature cells per image pixel (``1/4`` for a stride-4
        backbone); a static positive number.
      layout: ``"NHWC"`` (default) or ``"NCHW"``.
      bins: ``"fast_rcnn"`` (default, as ``torchvision.ops.roi_pool``) or
        ``"partition"``.

    Example::

        import flax.nnx as nnx
        import jax.numpy as jnp
        from jax_roipool.nnx import RoIPool

        class Head(nnx.Module):
            def __init__(self, rngs: nnx.Rngs):
                self.conv = nnx.Conv(3, 16, (3, 3), strides=4, rngs=rngs)
                self.pool = RoIPool(7, spatial_scale=1 / 4)
                self.fc = nnx.Linear(7 * 7 * 16, 4, rngs=rngs)

            def __call__(self, images, boxes):          # boxes: [N, K, 4]
                x = self.pool(self.conv(images), boxes)  # [N, K, 7, 7, 16]
                return self.fc(x.reshape(x.shape[:2] + (-1,)))

        model = Head(nnx.Rngs(0))
        images = jnp.zeros((2, 64, 64, 3))
        boxes = jnp.array([[[4., 4., 30., 30.]], [[10., 0., 63., 40.]]])
        logits = model(images, boxes)                    # [2, 1, 4]
    """

    def __init__(self, output_size: OutputSize, spatial_scale: float = 1.0, *,
                 layout: str = "NHWC", bins: str = "fast_rcnn") -> None:
        config = check_config(output_size, spatial_scale, layout, bins)
        self.output_size = config.pooled
        self.spatial_scale = config.spatial_scale
        self.layout = layout
        self.bins = bins

    def __call__(self, features: jax.typing.ArrayLike, rois: jax.typing.ArrayLike) -> jax.Array:
        """Pools ``features`` over ``rois``.

        Args:
          features: ``[N, H, W, C]`` (NHWC) or ``[N, C, H, W]`` (NCHW).
          rois: ``[R, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or per-image
            boxes ``[N, K, 4]`` rows ``(x1, y1, x2, y2)``, in image pixels.

        Returns:
          ``[R, PH, PW, C]`` / ``[R, C, PH, PW]``, or ``[N, K, PH, PW, C]`` /
          ``[N, K, C, PH, PW]`` for per-image boxes.
        """
        return roi_pool(features, rois, self.output_size, self.spatial_scale,
                        layout=self.layout, bins=self.bins)
