"""Flax Linen layer for RoI max pooling (imports ``flax``; ``import jax_roipool`` does not)."""

from __future__ import annotations

import flax.linen as nn
import jax

from ._api import OutputSize, roi_pool
from ._checks import check_config

__all__ = ["RoIPool"]


class RoIPool(nn.Module):
    """Fast R-CNN RoI max pooling as a parameter-free ``flax.linen`` module.

    A thin wrapper around :func:`jax_roipool.roi_pool`; it has no parameters or
    state, so ``init`` returns empty ``params``. It works under ``jit``,
    ``vmap`` and ``grad`` like the function (gradients flow to the features;
    the RoIs get a zero gradient).

    Attributes:
      output_size: ``PH`` (square bins) or ``(PH, PW)``.
      spatial_scale: feature cells per image pixel (``1/4`` for a stride-4
        backbone); a static positive number.
      layout: ``"NHWC"`` (default) or ``"NCHW"``.
      bins: ``"fast_rcnn"`` (default, as ``torchvision.ops.roi_pool``) or
        ``"partition"``.

    Example::

        import flax.linen as nn
        import jax, jax.numpy as jnp
        from jax_roipool.linen import RoIPool

        class Head(nn.Module):
            @nn.compact
            def __call__(self, images, boxes):          # boxes: [N, K, 4]
                x = nn.Conv(16, (3, 3), strides=4)(images)   # stride 4
                x = RoIPool(7, spatial_scale=1 / 4)(x, boxes)  # [N, K, 7, 7, 16]
                return nn.Dense(4)(x.reshape(x.shape[:2] + (-1,)))

        images = jnp.zeros((2, 64, 64, 3))
        boxes = jnp.array([[[4., 4., 30., 30.]], [[10., 0., 63., 40.]]])
        model = Head()
        params = model.init(jax.random.key(0), images, boxes)
        logits = model.apply(params, images, boxes)   # [2, 1, 4]
    """

    output_size: OutputSize
    spatial_scale: float = 1.0
    layout: str = "NHWC"
    bins: str = "fast_rcnn"

    def __post_init__(self) -> None:
        # Bad arguments fail where the layer is made, not at its first call.
        config = check_config(self.output_size, self.spatial_scale, self.layout, self.bins)
        # Kept as (PH, PW) and a float, as the NNX layer keeps them: a list or
        # an array as given would make the module unhashable (a static
        # argument of jax.jit must hash).
        object.__setattr__(self, "output_size", config.pooled)
        object.__setattr__(self, "spatial_scale", config.spatial_scale)
        super().__post_init__()

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
