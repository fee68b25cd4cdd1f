"""Makes ``tests/data/torchvision_roi_pool.npz``: torchvision.ops.roi_pool golden cases.

Run it with a python that has torch + torchvision with working compiled ops
(the CPU kernels are used), e.g.::

    /work/main/.venv-torch/bin/python tests/data/make_torchvision_golden.py

It is deterministic (fixed seed, no torch RNG): rerunning it with the same
numpy reproduces the same inputs; the outputs are torchvision's.

File layout (``np.load(path)``; every case is a set of keys with the prefix
``cNN_``, NN = 00 .. case_count-1, zero-padded to two digits)::

    case_count            int64 scalar, number of cases
    torch_version         str scalar (0-d unicode array), e.g. "2.13.0+cu130"
    torchvision_version   str scalar
    numpy_seed            int64 scalar, seed of the generator
    cNN_features          [N, C, H, W] float32, float64 or float16 (NCHW;
                          transpose with (0, 2, 3, 1) for NHWC). The case's
                          dtype is features.dtype; rois, output, cotangent and
                          grad have the same dtype. For float16, torchvision
                          computes the scaled corners, bin sizes and bin edges
                          in float16 too (with the scale rounded to float16).
    cNN_rois              [R, 5] rows (batch_index, x1, y1, x2, y2) in image
                          coordinates, same dtype as the features (torchvision
                          requires it). Batch indices are integers in [0, N);
                          coordinates are finite (torchvision is undefined
                          otherwise). Includes boxes inside the map, partly and
                          completely outside it, inverted (x2 < x1 and/or
                          y2 < y1), zero-size, tiny, whole-image, far away,
                          and boxes whose coordinates * spatial_scale land
                          exactly on k + 0.5 (in the coordinate dtype). The
                          last cases ("far" kind) have scaled corners from
                          2^28 to 2^31 cells, each RoI checked (by
                          tests/reference_loop.py) to keep every int step of
                          torchvision's geometry within int32.
    cNN_spatial_scale     float64 scalar: 1, 0.5, 1/16 or 0.3 (torchvision
                          computes rois * scale in the features' dtype)
    cNN_output_size       int64 [2]: (PH, PW)
    cNN_output            [R, C, PH, PW] torchvision.ops.roi_pool(features,
                          rois, (PH, PW), spatial_scale)
    cNN_argmax            [R, C, PH, PW] int32: torchvision's argmax, the index
                          h * W + w inside the RoI's image plane (NOT including
                          the batch index), -1 for empty bins
    cNN_cotangent         [R, C, PH, PW]: the output cotangent, dyadic values
                          k / 8 with integer k in [-16, 16], so every sum of
                          them is exact and the gradient does not depend on the
                          order of accumulation
    cNN_grad_features     [N, C, H, W]: d(sum(output * cotangent)) / d features
                          from torch autograd
    cNN_feature_kind      str scalar: "normal" (standard normal * 3, ties are
                          very unlikely), "ties" (integers in [-2, 2]: ties
                          are frequent; torchvision keeps the first maximum in
                          row-major (h, then w) order inside a bin) or "far"
                          (normal features, far corners)

Mind: ``jax.config.update("jax_enable_x64", True)`` (or ``jax.enable_x64``)
is needed to feed the float64 cases to jax without a silent downcast.
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import torch
import torchvision
from torchvision.ops import roi_pool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reference_loop  # noqa: E402  (tests/, numpy only)

SEED = 20261124
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_roi_pool.npz")
SCALES = (1.0, 0.5, 1.0 / 16, 0.3)
OUTPUT_SIZES = ((1, 1), (2, 2), (7, 7), (3, 5), (14, 14))
# (N, C, H, W): non-square maps, N = 1..3, C = 1..8.
SHAPES = ((1, 3, 5, 7), (2, 4, 9, 6), (3, 2, 12, 10), (2, 8, 11, 16), (1, 1, 20, 17),
          (2, 5, 16, 24), (3, 6, 8, 13), (1, 8, 18, 14), (2, 3, 7, 19))
ROIS_PER_CASE = 24
MAX_BYTES = 2 * 1024 * 1024


def half_coordinates(rng, scale: float, dtype, count: int, lo: int, hi: int) -> np.ndarray:
    """Image coordinates x with dtype(x) * dtype(scale) == k + 0.5 exactly, k in [lo, hi).

    Starts from (k + 0.5) / scale and walks a few ulps either way; for scales
    where no such x exists near some k that k is skipped.
    """
    s = dtype(scale)
    found = []
    for k in rng.permutation(np.arange(lo, hi)):
        target = dtype(k + 0.5)
        x = dtype((k + 0.5) / scale)
        candidates = [x]
        up = down = x
        for _ in range(8):
            up, down = np.nextafter(up, dtype(np.inf)), np.nextafter(down, dtype(-np.inf))
            candidates += [up, down]
        for c in candidates:
            if dtype(c * s) == target:
                found.append(c)
                break
        if len(found) == count:
            break
    return np.array(found, dtype)


def make_rois(rng, n: int, h: int, w: int, scale: float, dtype, r: int) -> np.ndarray:
    """[r, 5] rois (valid batch indices, finite coordinates) mixing box kinds."""
    img_h, img_w = h / scale, w / scale
    kinds = ["inside", "inside", "inside", "inside", "partial", "partial", "outside", "inverted",
             "zero", "tiny", "whole", "far", "half", "half", "half"]
    rows = []
    halves_x = list(half_coordinates(rng, scale, dtype, 64, -2, w + 2))
    halves_y = list(half_coordinates(rng, scale, dtype, 64, -2, h + 2))
    for i in range(r):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        b = float(rng.integers(0, n))
        if kind == "inside":
            x1, x2 = np.sort(rng.uniform(0, img_w - 1, 2))
            y1, y2 = np.sort(rng.uniform(0, img_h - 1, 2))
        elif kind == "partial":
            x1, x2 = np.sort(rng.uniform(-0.5 * img_w, 1.5 * img_w, 2))
            y1, y2 = np.sort(rng.uniform(-0.5 * img_h, 1.5 * img_h, 2))
        elif kind == "outside":
            side = rng.integers(4)
            x1, x2 = np.sort(rng.uniform(0, img_w, 2))
            y1, y2 = np.sort(rng.uniform(0, img_h, 2))
            shift_x, shift_y = [(-1.6 * img_w, 0), (1.6 * img_w, 0), (0, -1.6 * img_h),
                                (0, 1.6 * img_h)][side]
            x1, x2, y1, y2 = x1 + shift_x, x2 + shift_x, y1 + shift_y, y2 + shift_y
        elif kind == "inverted":
            x2, x1 = np.sort(rng.uniform(0, img_w, 2))
            y1, y2 = np.sort(rng.uniform(0, img_h, 2))
            if rng.random() < 0.5:
                y1, y2 = y2, y1
        elif kind == "zero":
            x1 = x2 = rng.uniform(0, img_w)
            y1 = rng.uniform(0, img_h)
            y2 = y1 if rng.random() < 0.5 else rng.uniform(y1, img_h)
        elif kind == "tiny":
            x1, y1 = rng.uniform(0, img_w - 1), rng.uniform(0, img_h - 1)
            x2, y2 = x1 + rng.uniform(0, 1 / scale), y1 + rng.uniform(0, 1 / scale)
        elif kind == "whole":
            x1, y1, x2, y2 = 0.0, 0.0, img_w - 1, img_h - 1
        elif kind == "far":
            x1, y1 = rng.uniform(-3 * img_w, 0), rng.uniform(-3 * img_h, 0)
            x2, y2 = rng.uniform(img_w, 4 * img_w), rng.uniform(img_h, 4 * img_h)
        else:  # "half": every coordinate * scale is exactly k + 0.5 (where one exists)
            x1, x2 = (sorted(rng.choice(halves_x, 2)) if len(halves_x) >= 2
                      else np.sort(rng.uniform(0, img_w, 2)))
            y1, y2 = (sorted(rng.choice(halves_y, 2)) if len(halves_y) >= 2
                      else np.sort(rng.uniform(0, img_h, 2)))
        rows.append([b, x1, y1, x2, y2])
    rois = np.array(rows, np.float64).astype(dtype)
    assert np.isfinite(rois).all()
    return rois


def make_far_rois(rng, n: int, h: int, w: int, scale: float, output_size, dtype,
                  r: int) -> np.ndarray:
    """[r, 5] rois whose scaled corners reach 2^28 to 2^31 cells on one or both
    sides of the map, on either axis, and whose geometry fits int32."""
    def axis(extent: int) -> tuple[float, float]:
        far = rng.uniform(2.0**28, 2.0**31, 2)
        near = np.sort(rng.uniform(-2, extent + 2, 2))
        return [(-far[0] / 2, far[1] / 2),  # far on both sides of the map
                (-far[0], near[1]),  # far before the map, ending on it
                (near[0], far[1]),  # starting on the map, far after it
                tuple(near)][rng.integers(4)]  # an ordinary axis

    rows = []
    while len(rows) < r:
        (x1, x2), (y1, y2) = axis(w), axis(h)
        roi = np.array([rng.integers(0, n), x1 / scale, y1 / scale, x2 / scale, y2 / scale],
                       np.float64).astype(dtype)
        # The loop reference checks each of torchvision's int steps: a RoI it
        # calls valid is one where torchvision's result is defined.
        if reference_loop.roi_geometry(roi, n, h, w, output_size, scale, "fast_rcnn",
                                       dtype) is not None:
            rows.append(roi)
    return np.array(rows, dtype)


def make_features(rng, shape, dtype, kind: str) -> np.ndarray:
    if kind == "ties":
        return rng.integers(-2, 3, shape).astype(dtype)
    return (rng.standard_normal(shape) * 3).astype(dtype)


def torchvision_case(features, rois, scale, output_size, cotangent):
    x = torch.from_numpy(features.copy()).requires_grad_(True)
    boxes = torch.from_numpy(rois.copy())
    out = roi_pool(x, boxes, output_size, scale)
    out.backward(torch.from_numpy(cotangent.copy()))
    out2, argmax = torch.ops.torchvision.roi_pool(x.detach(), boxes, scale, *output_size)
    assert torch.equal(out.detach(), out2), "roi_pool and torch.ops.torchvision.roi_pool differ"
    return out.detach().numpy(), argmax.numpy().astype(np.int32), x.grad.numpy()


def main() -> int:
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}

    def add_case(features, rois, scale, output_size, kind):
        ph, pw = output_size
        cotangent = (rng.integers(-16, 17, (len(rois), features.shape[1], ph, pw)) / 8).astype(
            features.dtype)
        out, argmax, grad = torchvision_case(features, rois, scale, output_size, cotangent)
        p = f"c{arrays.get('case_count', 0):02d}_"
        arrays[p + "features"] = features
        arrays[p + "rois"] = rois
        arrays[p + "spatial_scale"] = np.float64(scale)
        arrays[p + "output_size"] = np.array(output_size, np.int64)
        arrays[p + "output"] = out
        arrays[p + "argmax"] = argmax
        arrays[p + "cotangent"] = cotangent
        arrays[p + "grad_features"] = grad
        arrays[p + "feature_kind"] = np.array(kind)
        arrays["case_count"] = np.int64(arrays.get("case_count", 0) + 1)

    combos = list(itertools.product(SCALES, OUTPUT_SIZES))
    # float16 last, so that the float32 and float64 cases stay as they were.
    for dtype in (np.float32, np.float64, np.float16):
        for j, (scale, output_size) in enumerate(combos):
            shift = {np.float32: 0, np.float64: 3, np.float16: 6}[dtype]
            n, c, h, w = SHAPES[(j + shift) % len(SHAPES)]
            r = ROIS_PER_CASE
            if output_size == (14, 14):  # keep the file small
                c, r = min(c, 2), 16
            kind = "ties" if j % 3 == 2 else "normal"
            features = make_features(rng, (n, c, h, w), dtype, kind)
            rois = make_rois(rng, n, h, w, scale, dtype, r)
            add_case(features, rois, scale, output_size, kind)
    # Last, far corners where torchvision's int arithmetic still fits int32.
    for k, (dtype, scale, output_size) in enumerate((
            (np.float32, 1.0, (7, 7)), (np.float32, 1.0 / 16, (3, 5)),
            (np.float64, 1.0, (3, 5)), (np.float64, 1.0 / 16, (7, 7)))):
        n, c, h, w = SHAPES[k]
        features = make_features(rng, (n, c, h, w), dtype, "normal")
        rois = make_far_rois(rng, n, h, w, scale, output_size, dtype, ROIS_PER_CASE)
        add_case(features, rois, scale, output_size, "far")
    index = int(arrays["case_count"])
    arrays["torch_version"] = np.array(torch.__version__)
    arrays["torchvision_version"] = np.array(torchvision.__version__)
    arrays["numpy_seed"] = np.int64(SEED)
    np.savez_compressed(OUT_PATH, **arrays)
    size = os.path.getsize(OUT_PATH)
    empty = sum(int((arrays[f"c{i:02d}_argmax"] < 0).sum()) for i in range(index))
    total = sum(arrays[f"c{i:02d}_argmax"].size for i in range(index))
    print(f"wrote {OUT_PATH}: {index} cases, {size / 1024:.0f} KiB, "
          f"{empty}/{total} empty output bins, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}")
    if size > MAX_BYTES:
        print(f"error: {size} bytes > {MAX_BYTES}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
