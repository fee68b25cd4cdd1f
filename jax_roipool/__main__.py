"""``python -m jax_roipool``: the seed article's worked example and a small benchmark."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_roipool as jrp
from jax_roipool import reference

# The 8x8 feature map of the deepsense.ai "RoI pooling explained" article.
SEED_MAP = np.array([
    [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
    [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
    [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
    [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],
    [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],
    [0.20, 0.14, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],
    [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],
    [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],
], np.float32)
# Region with top-left corner (0, 3) and bottom-right corner (7, 8): 7 wide, 5 tall.
SEED_ROI = np.array([[0, 0, 3, 7, 8]], np.float32)
SEED_EXPECTED = np.array([[0.85, 0.84], [0.97, 0.96]], np.float32)


def seed_example() -> np.ndarray:
    """Pools the article's region to 2x2 with the article's sections (bins="partition")."""
    out = jrp.roi_pool(SEED_MAP[None, :, :, None], SEED_ROI, (2, 2), bins="partition")
    return np.asarray(out[0, :, :, 0])


def _median_ms(fn, *args, repeats: int = 7) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def small_benchmark(rois: int = 256, channels: int = 64) -> dict[str, float]:
    """Native kernel vs the pure-jnp reference on a small detector-like workload."""
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.normal(size=(2, 50, 68, channels)), jnp.float32)
    x1, y1 = rng.uniform(0, 1000, rois), rng.uniform(0, 700, rois)
    w, h = rng.uniform(16, 400, rois), rng.uniform(16, 400, rois)
    boxes = np.stack([rng.integers(0, 2, rois), x1, y1, x1 + w, y1 + h], 1)
    boxes = jnp.asarray(boxes, jnp.float32)

    def pool(impl):
        return jax.jit(lambda f, b: impl(f, b, 7, 1 / 16))

    native, plain = pool(jrp.roi_pool), pool(reference.roi_pool)
    np.testing.assert_array_equal(native(features, boxes), plain(features, boxes))
    grad = jax.jit(jax.grad(lambda f, b: jrp.roi_pool(f, b, 7, 1 / 16).sum()))
    return {
        "native forward": _median_ms(native, features, boxes),
        "native forward+backward": _median_ms(grad, features, boxes),
        "pure-jnp forward": _median_ms(plain, features, boxes),
    }


def main() -> None:
    print("jax_roipool demo: jax", jax.__version__, "on", jax.devices()[0].platform)
    out = seed_example()
    print("\nSeed article example (8x8 map, region (0,3)-(7,8), 2x2 output):")
    print(out)
    np.testing.assert_array_equal(out, SEED_EXPECTED)
    print("matches the article: [[0.85, 0.84], [0.97, 0.96]]")

    print("\nSmall benchmark: N=2, 50x68 map, C=64, R=256 rois, 7x7, scale 1/16, float32")
    times = small_benchmark()
    base = times["pure-jnp forward"]
    for name, ms in times.items():
        print(f"  {name:<26} {ms:9.2f} ms   ({base / ms:6.1f}x vs pure-jnp forward)")


if __name__ == "__main__":
    main()
