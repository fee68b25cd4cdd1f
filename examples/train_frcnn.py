"""Train a small Fast R-CNN-style detector head end to end on synthetic shapes.

Each image holds a few coloured squares, discs and triangles on a noisy
background; the colour of a shape is drawn independently of its class, so the
network has to look at the shape. Proposals are jittered ground-truth boxes
plus random boxes; a proposal whose best IoU with a ground-truth box is below
0.5 is background, as in Fast R-CNN.

    image -> conv backbone (stride 4) -> roi_pool 7x7 -> MLP -> class logits
                                                             -> box deltas

The loss is softmax cross-entropy plus smooth-L1 on the (class-specific) box
deltas of the foreground proposals; the optimiser is optax Adam and the
training step runs under ``jax.jit``. At the end it reports the held-out
classification accuracy of the proposals (against the majority-class rate),
the mean IoU of the foreground proposals before and after box refinement, and
draws the top-scoring refined detections of some held-out images into a PNG.

Data parallel: ``--devices 4`` runs the same jitted step on a 1-D device mesh
with the batch (images and per-image boxes ``[N, K, 4]``) sharded along it
and the parameters replicated. On a CPU-only machine it sets
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before importing jax
(unless ``XLA_FLAGS`` already forces a device count).

    python examples/train_frcnn.py                      # ~1-3 min on 2 CPU cores
    python examples/train_frcnn.py --devices 4 --out /tmp/dp.png

Needs the ``examples`` extra: ``pip install -e .[examples]`` (flax, optax,
tqdm, pillow).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

# ``--devices N`` has to take effect before jax is imported.
_FORCE_FLAG = "--xla_force_host_platform_device_count"


def _force_host_devices(count: int) -> None:
    """Asks XLA for ``count`` CPU devices unless XLA_FLAGS already sets a count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count > 1 and _FORCE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FORCE_FLAG}={count}".strip()


if __name__ == "__main__":
    _early = argparse.ArgumentParser(add_help=False)
    _early.add_argument("--devices", type=int, default=1)
    _force_host_devices(_early.parse_known_args()[0].devices)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from jax_roipool.linen import RoIPool  # noqa: E402

CLASS_NAMES = ("background", "square", "disc", "triangle")
NUM_CLASSES = len(CLASS_NAMES)
FG_IOU = 0.5                                     # Fast R-CNN's foreground threshold
DELTA_STD = np.array([0.1, 0.1, 0.2, 0.2], np.float32)  # target normalisation
STRIDE = 4                                       # backbone stride -> spatial_scale 1/4
MAX_SHAPES = 4


# ---------------------------------------------------------------------------
# Synthetic data (numpy, deterministic for a given Generator).

def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [..., A, 4] and b [..., B, 4] (x1, y1, x2, y2) -> [..., A, B]."""
    a = a[..., :, None, :]
    b = b[..., None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _shape_mask(cls: int, box, yy: np.ndarray, xx: np.ndarray, flip: bool) -> np.ndarray:
    x1, y1, x2, y2 = box
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    px, py = xx + 0.5, yy + 0.5                  # pixel centres
    if cls == 1:                                 # square
        return (px >= x1) & (px <= x2) & (py >= y1) & (py <= y2)
    if cls == 2:                                 # disc
        return (px - cx) ** 2 + (py - cy) ** 2 <= half ** 2
    # triangle: apex at the top (or bottom when flipped), base on the other side
    t = (py - y1) / (y2 - y1)
    if flip:
        t = 1.0 - t
    return (t >= 0) & (t <= 1) & (np.abs(px - cx) <= half * t)


def _encode(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Fast R-CNN box deltas (dx, dy, dw, dh) from proposals to gt, normalised."""
    pw, ph = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
    gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    d = np.stack([(gt[..., 0] + gt[..., 2] - proposals[..., 0] - proposals[..., 2]) / (2 * pw),
                  (gt[..., 1] + gt[..., 3] - proposals[..., 1] - proposals[..., 3]) / (2 * ph),
                  np.log(gw / pw), np.log(gh / ph)], axis=-1)
    return (d / DELTA_STD).astype(np.float32)


def decode(proposals, deltas):
    """Inverse of the encoding: refined boxes from proposals and normalised deltas."""
    xp = jnp if isinstance(deltas, jax.Array) else np
    d = deltas * DELTA_STD
    pw, ph = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
    cx = (proposals[..., 0] + proposals[..., 2]) / 2 + d[..., 0] * pw
    cy = (proposals[..., 1] + proposals[..., 3]) / 2 + d[..., 1] * ph
    w = pw * xp.exp(xp.clip(d[..., 2], -4.0, 4.0))
    h = ph * xp.exp(xp.clip(d[..., 3], -4.0, 4.0))
    return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def make_dataset(num_images: int, rng: np.random.Generator, *, image_size: int = 64,
                 proposals: int = 16) -> dict[str, np.ndarray]:
    """Generates ``num_images`` synthetic images with proposals and their targets.

    Returns numpy arrays:
      images [N, S, S, 3] float32 in [0, 1];
      gt_boxes [N, MAX_SHAPES, 4], gt_classes [N, MAX_SHAPES] (0 = padding);
      boxes [N, K, 4] proposals (x1, y1, x2, y2) in pixels;
      labels [N, K] int32 class of each proposal (0 = background);
      targets [N, K, 4] normalised deltas to the matched ground truth;
      matched [N, K, 4] the matched ground-truth box.
    """
    s, k = image_size, proposals
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    images = np.empty((num_images, s, s, 3), np.float32)
    gt_boxes = np.zeros((num_images, MAX_SHAPES, 4), np.float32)
    gt_classes = np.zeros((num_images, MAX_SHAPES), np.int32)
    boxes = np.empty((num_images, k, 4), np.float32)
    lo, hi = 0.2 * s, 0.42 * s                     # shape sizes (13-27 px at 64)
    for n in range(num_images):
        # Background: a dim random colour, a linear gradient and pixel noise.
        base = _hsv_to_rgb(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.1, 0.35))
        grad = rng.normal(0, 0.08, 3)[:, None, None] * (xx * rng.normal() + yy * rng.normal()) / s
        img = base[None, None, :] + np.moveaxis(grad, 0, -1) + rng.normal(0, 0.04, (s, s, 3))
        count = rng.integers(1, MAX_SHAPES + 1)
        placed = []
        for _ in range(40 * count):                # rejection sampling: little overlap
            if len(placed) == count:
                break
            size = rng.uniform(lo, hi)
            x1, y1 = rng.uniform(0, s - size, 2)
            box = np.array([x1, y1, x1 + size, y1 + size], np.float32)
            if placed and _box_iou(box[None], np.stack([b for b, _ in placed])).max() > 0.05:
                continue
            cls = int(rng.integers(1, NUM_CLASSES))
            colour = _hsv_to_rgb(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
            mask = _shape_mask(cls, box, yy, xx, flip=bool(rng.random() < 0.5))
            img[mask] = colour + rng.normal(0, 0.04, (int(mask.sum()), 3))
            placed.append((box, cls))
        images[n] = np.clip(img, 0.0, 1.0)
        for g, (box, cls) in enumerate(placed):
            gt_boxes[n, g], gt_classes[n, g] = box, cls
        # Proposals: 5/8 are jittered ground truth, the rest random boxes.
        jittered = (5 * k) // 8
        owners = np.arange(jittered) % len(placed)
        gt = gt_boxes[n, owners]
        w, h = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
        cx = (gt[:, 0] + gt[:, 2]) / 2 + rng.normal(0, 0.12, jittered) * w
        cy = (gt[:, 1] + gt[:, 3]) / 2 + rng.normal(0, 0.12, jittered) * h
        w = w * np.exp(rng.normal(0, 0.2, jittered))
        h = h * np.exp(rng.normal(0, 0.2, jittered))
        boxes[n, :jittered] = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        size = rng.uniform(0.12 * s, 0.6 * s, (k - jittered, 2))
        corner = rng.uniform(0, 1, (k - jittered, 2)) * (s - size)
        boxes[n, jittered:] = np.concatenate([corner, corner + size], -1)
    boxes = np.clip(boxes, 0, s - 1)
    # Label each proposal by its best-overlapping ground truth.
    iou = _box_iou(boxes, gt_boxes)                  # [N, K, G]
    iou = np.where(gt_classes[:, None, :] > 0, iou, -1.0)
    best = iou.argmax(-1)
    best_iou = np.take_along_axis(iou, best[..., None], -1)[..., 0]
    matched = np.take_along_axis(gt_boxes, best[..., None].repeat(4, -1), 1)
    labels = np.where(best_iou >= FG_IOU, np.take_along_axis(gt_classes, best, 1), 0)
    return dict(images=images, gt_boxes=gt_boxes, gt_classes=gt_classes, boxes=boxes,
                labels=labels.astype(np.int32), targets=_encode(boxes, matched),
                matched=matched)


# ---------------------------------------------------------------------------
# Model.

class Backbone(nn.Module):
    """A small conv net with stride 4."""

    @nn.compact
    def __call__(self, x):
        for features, stride in ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1)):
            x = nn.relu(nn.Conv(features, (3, 3), strides=stride)(x))
        return x


class Detector(nn.Module):
    """Backbone -> roi_pool -> 2-layer MLP -> class logits and class-specific box deltas."""

    num_classes: int = NUM_CLASSES
    pool_size: int = 7
    hidden: int = 256

    @nn.compact
    def __call__(self, images, boxes):                        # boxes: [N, K, 4]
        features = Backbone(name="backbone")(images)           # [N, S/4, S/4, 64]
        pooled = RoIPool(self.pool_size, spatial_scale=1 / STRIDE)(features, boxes)
        x = pooled.reshape(pooled.shape[:2] + (-1,))          # [N, K, 7*7*64]
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        logits = nn.Dense(self.num_classes, name="cls")(x)
        deltas = nn.Dense(4 * self.num_classes, name="bbox",
                          kernel_init=nn.initializers.normal(0.001))(x)
        return logits, deltas.reshape(deltas.shape[:-1] + (self.num_classes, 4))


def create_model(config: "Config") -> Detector:
    return Detector(hidden=config.hidden)


def _select_class(deltas, classes):
    """deltas [..., C, 4], classes [...] -> deltas of that class [..., 4]."""
    return jnp.take_along_axis(deltas, classes[..., None, None], axis=-2)[..., 0, :]


def loss_fn(params, model, images, boxes, labels, targets):
    """Cross-entropy over all proposals + smooth-L1 on foreground box deltas."""
    logits, deltas = model.apply(params, images, boxes)
    cls_loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    fg = (labels > 0).astype(jnp.float32)
    box = optax.huber_loss(_select_class(deltas, labels), targets, delta=1.0).sum(-1)
    box_loss = (box * fg).sum() / jnp.maximum(fg.sum(), 1.0)
    return cls_loss + box_loss, (cls_loss, box_loss)


# ---------------------------------------------------------------------------
# Training.

@dataclasses.dataclass
class Config:
    steps: int = 2000
    batch: int = 16
    seed: int = 0
    learning_rate: float = 1e-3
    devices: int = 1
    image_size: int = 64
    proposals: int = 16
    hidden: int = 256
    heldout: int = 128                          # held-out images for the accuracy
    platform: str | None = None                 # "cpu", "gpu", ...; None: jax's default
    log_every: int = 0                          # 0: about 10 lines per run
    out: str | None = None                      # PNG of held-out detections
    quiet: bool = False


def make_mesh(devices: int, platform: str | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over the first ``devices`` devices."""
    available = jax.devices(platform)
    if len(available) < devices:
        raise RuntimeError(
            f"asked for {devices} devices but jax sees {len(available)}; on CPU set "
            f"XLA_FLAGS={_FORCE_FLAG}={devices} before importing jax (the CLI does this)")
    return Mesh(np.array(available[:devices]), ("data",))


def train(config: Config) -> dict:
    """Trains the detector and evaluates it on held-out images.

    Returns a dict: losses (per step), cls_losses, box_losses, accuracy,
    chance (majority-class rate of the held-out proposals), iou_proposals and
    iou_refined (mean IoU with the matched ground truth of the held-out
    foreground proposals, before/after refinement by the predicted deltas of
    their true class), backbone_grad_norm (at the first step), seconds, and
    devices.
    """
    if config.batch % config.devices or config.heldout % config.devices:
        raise ValueError("--batch and the held-out set must be divisible by --devices")
    mesh = make_mesh(config.devices, config.platform)
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))   # split along N
    replicated = NamedSharding(mesh, PartitionSpec())

    seeds = np.random.SeedSequence(config.seed).spawn(2)
    train_rng, heldout_rng = (np.random.default_rng(s) for s in seeds)
    gen = functools.partial(make_dataset, image_size=config.image_size,
                            proposals=config.proposals)

    model = create_model(config)
    size = config.image_size
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, 3)),
                        jnp.zeros((1, config.proposals, 4)))
    tx = optax.adam(config.learning_rate)
    state = jax.device_put((params, tx.init(params)), replicated)

    @functools.partial(jax.jit, donate_argnums=0,
                       out_shardings=(replicated, replicated, replicated))
    def train_step(state, images, boxes, labels, targets):
        params, opt_state = state
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model, images, boxes, labels, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        grad_norm = optax.tree.norm(grads["params"]["backbone"])
        return (optax.apply_updates(params, updates), opt_state), \
            jnp.stack([loss, *parts]), grad_norm

    def to_device(batch, keys=("images", "boxes", "labels", "targets")):
        return [jax.device_put(batch[k], data_sharding) for k in keys]

    log_every = config.log_every or max(1, config.steps // 10)
    metrics, grad_norm = [], None
    progress = _progress(config)
    start = time.perf_counter()
    for step in progress:
        state, m, g = train_step(state, *to_device(gen(config.batch, train_rng)))
        metrics.append(m)
        grad_norm = g if grad_norm is None else grad_norm
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            recent = float(jnp.mean(jnp.stack(metrics[-log_every:])[:, 0]))
            progress.set_postfix(loss=f"{recent:.3f}")
            if not config.quiet:
                progress.write(f"step {step + 1:5d}  loss {recent:.4f} (mean of last "
                               f"{min(log_every, len(metrics))})")
    metrics = np.asarray(jax.device_get(jnp.stack(metrics))) if metrics else np.zeros((0, 3))
    seconds = time.perf_counter() - start

    heldout = gen(config.heldout, heldout_rng)
    params = state[0]
    logits, deltas = evaluate(model, params, heldout, data_sharding)
    labels = heldout["labels"]
    predicted = logits.argmax(-1)
    fg = labels > 0
    refined = decode(heldout["boxes"], np.take_along_axis(
        deltas, labels[..., None, None], -2)[..., 0, :])
    iou_of = lambda b: _box_iou(b[:, :, None], heldout["matched"][:, :, None])[..., 0, 0]
    results = dict(
        losses=metrics[:, 0].tolist(), cls_losses=metrics[:, 1].tolist(),
        box_losses=metrics[:, 2].tolist(),
        accuracy=float((predicted == labels).mean()),
        fg_accuracy=float((predicted == labels)[fg].mean()),
        chance=float(np.bincount(labels.ravel(), minlength=NUM_CLASSES).max() / labels.size),
        iou_proposals=float(iou_of(heldout["boxes"])[fg].mean()),
        iou_refined=float(iou_of(refined)[fg].mean()),
        backbone_grad_norm=float(grad_norm) if grad_norm is not None else 0.0,
        seconds=seconds, steps=config.steps, batch=config.batch, devices=config.devices)
    if config.out:
        draw_detections(heldout, logits, deltas, config.out)
        results["out"] = config.out
    return results


def _progress(config: Config):
    try:
        from tqdm.auto import tqdm
    except ImportError:                          # the progress bar is a nicety
        class tqdm:                                                  # noqa: N801
            def __init__(self, iterable, **_):
                self.iterable = iterable

            def __iter__(self):
                return iter(self.iterable)

            def set_postfix(self, **_):
                pass

            write = staticmethod(print)
    return tqdm(range(config.steps), disable=config.quiet, desc="train", unit="step",
                dynamic_ncols=True)


def evaluate(model, params, data, data_sharding, chunk: int = 32):
    """Class logits [N, K, C] and deltas [N, K, C, 4] of a dataset, as numpy."""
    devices = data_sharding.mesh.size
    chunk = max(devices, chunk - chunk % devices)
    apply = jax.jit(model.apply)
    outs = []
    n = len(data["images"])
    for i in range(0, n, chunk):
        images, boxes = data["images"][i:i + chunk], data["boxes"][i:i + chunk]
        if len(images) % devices:
            raise ValueError("the held-out set must be divisible by the device count")
        outs.append(jax.device_get(apply(params, jax.device_put(images, data_sharding),
                                         jax.device_put(boxes, data_sharding))))
    return (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))


# ---------------------------------------------------------------------------
# Detections picture.

def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    keep = []
    for i in np.argsort(-scores):
        if all(_box_iou(boxes[i][None], boxes[j][None])[0, 0] < threshold for j in keep):
            keep.append(int(i))
    return keep


def detections(logits, deltas, boxes, *, min_score=0.5, nms=0.3, top=6):
    """Top-scoring refined non-background detections of one image.

    logits [K, C], deltas [K, C, 4], boxes [K, 4] -> list of (box, class, score).
    """
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    cls = probs[:, 1:].argmax(-1) + 1
    score = probs[np.arange(len(cls)), cls]
    refined = decode(boxes, deltas[np.arange(len(cls)), cls])
    found = []
    for c in range(1, probs.shape[1]):
        idx = np.flatnonzero((cls == c) & (score >= min_score))
        for i in _nms(refined[idx], score[idx], nms):
            found.append((refined[idx[i]], c, float(score[idx[i]])))
    return sorted(found, key=lambda d: -d[2])[:top]


def draw_detections(data, logits, deltas, path, *, count=8, columns=4, scale=4):
    """Saves a grid of held-out images with ground truth (thin white) and detections."""
    from PIL import Image, ImageDraw

    colours = {1: (255, 80, 80), 2: (80, 220, 255), 3: (255, 230, 60)}
    s = data["images"].shape[1] * scale
    rows = math.ceil(count / columns)
    pad = 4
    canvas = Image.new("RGB", (columns * (s + pad) + pad, rows * (s + pad) + pad), (20, 20, 20))
    for n in range(count):
        img = Image.fromarray((data["images"][n] * 255).round().astype(np.uint8))
        img = img.resize((s, s), Image.NEAREST)
        draw = ImageDraw.Draw(img)
        for box, c in zip(data["gt_boxes"][n], data["gt_classes"][n]):
            if c:
                draw.rectangle([float(v) * scale for v in box], outline=(255, 255, 255))
        for box, c, score in detections(logits[n], deltas[n], data["boxes"][n]):
            xy = [float(v) * scale for v in box]
            draw.rectangle(xy, outline=colours[c], width=2)
            draw.text((xy[0] + 2, max(0.0, xy[1] - 11)), f"{CLASS_NAMES[c]} {score:.2f}",
                      fill=colours[c])
        canvas.paste(img, (pad + (n % columns) * (s + pad), pad + (n // columns) * (s + pad)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, optimize=True)


# ---------------------------------------------------------------------------
# Command line.

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch, help="images per step")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--devices", type=int, default=1, choices=(1, 2, 4, 8),
                        help="data-parallel over this many devices")
    parser.add_argument("--out", default="detections.png", help="PNG of held-out detections")
    parser.add_argument("--json", help="also write the results (per-step losses) to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or loss lines")
    args = parser.parse_args(argv)
    # Run as a script this was done before importing jax (top of the file); called
    # from Python it still works as long as jax has not initialised its backends.
    _force_host_devices(args.devices)
    config = Config(steps=args.steps, batch=args.batch, seed=args.seed,
                    learning_rate=args.lr, devices=args.devices, out=args.out or None,
                    quiet=args.quiet)
    results = train(config)
    losses = results["losses"]
    w = max(1, min(20, len(losses) // 10))
    print(f"devices {results['devices']}  steps {results['steps']}  batch {results['batch']}  "
          f"train time {results['seconds']:.1f} s")
    if losses:
        print(f"loss (mean of {w} steps): first {np.mean(losses[:w]):.4f}  "
              f"last {np.mean(losses[-w:]):.4f}")
    print(f"held-out accuracy {results['accuracy']:.3f} (foreground proposals "
          f"{results['fg_accuracy']:.3f}); chance (majority class) {results['chance']:.3f}")
    print(f"held-out foreground mean IoU: proposals {results['iou_proposals']:.3f} -> "
          f"refined {results['iou_refined']:.3f}")
    if config.out:
        print(f"detections: {config.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
