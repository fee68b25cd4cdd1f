"""Benchmark workloads (numpy only, deterministic).

RoI distribution (``random_rois``): for each of R rois, the batch index is
uniform over {0, ..., N-1}; the box width and height are independent and
uniform in [min_size, max_size] image pixels; the top-left corner (x1, y1) is
uniform over the positions that keep the whole box inside the image,
[0, W_img - width] x [0, H_img - height]; x2 = x1 + width, y2 = y1 + height
(continuous coordinates, as a region-proposal network would output after
clipping to the image). The image is ``1 / spatial_scale`` times the feature
map (800 x 1088 for a 50 x 68 map at 1/16).

For the Fast R-CNN workload at 1/16 a box covers on average about
13 x 13 feature cells (208 / 16), between 1 x 1 and 25 x 25.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEED = 20261124


@dataclass(frozen=True)
class Workload:
    name: str
    n: int
    c: int
    h: int
    w: int
    r: int
    output_size: tuple[int, int]
    spatial_scale: float = 1.0 / 16
    min_size: float = 16.0
    max_size: float = 400.0
    dtype: str = "float32"

    def describe(self) -> str:
        ph, pw = self.output_size
        return (f"{self.name}: N={self.n} C={self.c} {self.h}x{self.w} map, R={self.r} rois, "
                f"{ph}x{pw} output, scale 1/{1 / self.spatial_scale:g}, {self.dtype}, boxes "
                f"{self.min_size:g}..{self.max_size:g} px in a "
                f"{self.h / self.spatial_scale:g}x{self.w / self.spatial_scale:g} image")

    @property
    def feature_bytes(self) -> int:
        return self.n * self.c * self.h * self.w * np.dtype(self.dtype).itemsize

    @property
    def output_bytes(self) -> int:
        ph, pw = self.output_size
        return self.r * self.c * ph * pw * np.dtype(self.dtype).itemsize


FRCNN = Workload("frcnn", n=2, c=256, h=50, w=68, r=1024, output_size=(7, 7))
MASKRCNN = Workload("maskrcnn", n=2, c=256, h=100, w=136, r=1024, output_size=(14, 14),
                    min_size=32.0, max_size=800.0)
LARGE = Workload("large", n=8, c=512, h=100, w=136, r=8192, output_size=(7, 7),
                 min_size=32.0, max_size=800.0)


def random_rois(rng: np.random.Generator, wl: Workload) -> np.ndarray:
    """[R, 5] rows (batch, x1, y1, x2, y2) in image coordinates (see module doc)."""
    img_h, img_w = wl.h / wl.spatial_scale, wl.w / wl.spatial_scale
    size_hi_w = min(wl.max_size, img_w - 1)
    size_hi_h = min(wl.max_size, img_h - 1)
    bw = rng.uniform(wl.min_size, size_hi_w, wl.r)
    bh = rng.uniform(wl.min_size, size_hi_h, wl.r)
    x1 = rng.uniform(0.0, 1.0, wl.r) * (img_w - 1 - bw)
    y1 = rng.uniform(0.0, 1.0, wl.r) * (img_h - 1 - bh)
    batch = rng.integers(0, wl.n, wl.r).astype(np.float64)
    return np.stack([batch, x1, y1, x1 + bw, y1 + bh], axis=1).astype(wl.dtype)


def make_arrays(wl: Workload, seed: int = SEED, cotangent: bool = True) -> dict[str, np.ndarray]:
    """features (NCHW), rois, cotangent ([R, C, PH, PW]), output_size, spatial_scale.

    The cotangent holds dyadic values k / 8 (k in [-16, 16]) so that gradient
    sums are exact in any order and can be compared bit for bit.
    """
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((wl.n, wl.c, wl.h, wl.w), dtype=np.float32).astype(wl.dtype)
    rois = random_rois(rng, wl)
    arrays = {"features": features, "rois": rois,
              "output_size": np.array(wl.output_size, np.int64),
              "spatial_scale": np.float64(wl.spatial_scale)}
    if cotangent:
        ph, pw = wl.output_size
        k = rng.integers(-16, 17, (wl.r, wl.c, ph, pw), dtype=np.int8)
        arrays["cotangent"] = (k.astype(np.float32) / 8).astype(wl.dtype)
    return arrays
