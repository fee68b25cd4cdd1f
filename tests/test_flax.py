"""The Flax layers (jax_roipool.linen / jax_roipool.nnx) against jrp.roi_pool."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
from conftest import random_features, random_rois

import flax.linen as nn
from flax import nnx

from jax_roipool.linen import RoIPool as LinenRoIPool
from jax_roipool.nnx import RoIPool as NnxRoIPool

N, H, W, C = 2, 10, 12, 3
SCALE = 0.5
POOLED = (3, 4)
CONFIGS = [("NHWC", "fast_rcnn"), ("NCHW", "partition")]


def inputs(seed=0, layout="NHWC", r=9):
    rng = np.random.default_rng(seed)
    shape = (N, H, W, C) if layout == "NHWC" else (N, C, H, W)
    features = random_features(rng, shape, np.float32)
    rois = random_rois(rng, N, H, W, r, SCALE)
    boxes = rng.uniform(0, W / SCALE, (N, 4, 4)).astype(np.float32)
    boxes[..., 2:] = np.maximum(boxes[..., :2], boxes[..., 2:])  # some valid, some degenerate
    return features, rois, boxes


def expected(features, rois, layout, bins):
    return np.asarray(jrp.roi_pool(features, rois, POOLED, SCALE, layout=layout, bins=bins))


def linen_apply(layout, bins):
    layer = LinenRoIPool(POOLED, SCALE, layout, bins)
    return lambda f, r: layer.apply({}, f, r)


def nnx_apply(layout, bins):
    layer = NnxRoIPool(POOLED, SCALE, layout=layout, bins=bins)
    return lambda f, r: layer(f, r)


LAYERS = {"linen": linen_apply, "nnx": nnx_apply}


@pytest.mark.parametrize("layout,bins", CONFIGS)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_matches_function(kind, layout, bins):
    features, rois, boxes = inputs(1, layout)
    apply = LAYERS[kind](layout, bins)
    for r in (rois, boxes):  # [R, 5] and per-image [N, K, 4]
        want = expected(features, r, layout, bins)
        np.testing.assert_array_equal(np.asarray(apply(features, r)), want)
        np.testing.assert_array_equal(np.asarray(jax.jit(apply)(features, r)), want)
    assert apply(features, boxes).shape[:2] == (N, boxes.shape[1])


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_vmap(kind):
    rng = np.random.default_rng(2)
    features = np.stack([inputs(s)[0] for s in range(3)])
    rois = np.stack([random_rois(rng, N, H, W, 7, SCALE) for _ in range(3)])
    apply = LAYERS[kind]("NHWC", "fast_rcnn")
    got = jax.jit(jax.vmap(apply))(features, rois)
    want = np.stack([expected(f, r, "NHWC", "fast_rcnn") for f, r in zip(features, rois)])
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_grad_matches_function(kind):
    features, rois, _ = inputs(3)
    weights = np.random.default_rng(4).standard_normal((rois.shape[0],) + POOLED + (C,))
    apply = LAYERS[kind]("NHWC", "fast_rcnn")
    grad_layer = jax.grad(lambda f: jnp.sum(apply(f, rois) * weights))(features)
    grad_fn = jax.grad(lambda f: jnp.sum(
        jrp.roi_pool(f, rois, POOLED, SCALE) * weights))(features)
    np.testing.assert_array_equal(np.asarray(grad_layer), np.asarray(grad_fn))


def test_linen_init_has_no_params():
    features, rois, boxes = inputs(5)
    layer = LinenRoIPool(POOLED, SCALE)
    variables = layer.init(jax.random.key(0), features, boxes)
    assert jax.tree_util.tree_leaves(variables) == []
    assert not variables.get("params")
    np.testing.assert_array_equal(np.asarray(layer.apply(variables, features, rois)),
                                  expected(features, rois, "NHWC", "fast_rcnn"))


def test_nnx_module_is_stateless():
    layer = NnxRoIPool(POOLED, SCALE, layout="NCHW", bins="partition")
    assert jax.tree_util.tree_leaves(nnx.state(layer)) == []
    assert (layer.output_size, layer.spatial_scale, layer.layout, layer.bins) == (
        POOLED, SCALE, "NCHW", "partition")


def test_nnx_module_keeps_array_arguments_as_static_values():
    # A jax scalar scale (1 / jnp.float32(stride), say) must not become state,
    # which nnx.jit would trace.
    features, _, boxes = inputs()
    layer = NnxRoIPool(np.array(POOLED), 1 / jnp.float32(1 / SCALE))
    assert jax.tree_util.tree_leaves(nnx.state(layer)) == []
    assert type(layer.spatial_scale) is float and layer.output_size == POOLED
    out = nnx.jit(lambda m, f, b: m(f, b))(layer, features, boxes)
    np.testing.assert_array_equal(np.asarray(out), expected(features, boxes, "NHWC", "fast_rcnn"))


def test_linen_module_keeps_array_arguments_as_static_values():
    # A list or array output_size and a jax scalar scale, kept as given, would
    # make the module unhashable: no jit with the module a static argument.
    features, _, boxes = inputs()
    layer = LinenRoIPool(list(POOLED), 1 / jnp.float32(1 / SCALE))
    assert layer.output_size == POOLED and type(layer.spatial_scale) is float
    assert layer == LinenRoIPool(np.array(POOLED), SCALE) and hash(layer)
    out = jax.jit(lambda m, f, b: m.apply({}, f, b), static_argnums=0)(layer, features, boxes)
    np.testing.assert_array_equal(np.asarray(out), expected(features, boxes, "NHWC", "fast_rcnn"))


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("bad", [dict(output_size=0), dict(layout="nchw"), dict(bins="x"),
                                 dict(spatial_scale=-1.0)])
def test_bad_arguments_fail_when_the_layer_is_made(kind, bad):
    args = {**dict(output_size=POOLED, spatial_scale=SCALE, layout="NHWC", bins="fast_rcnn"),
            **bad}
    make = LinenRoIPool if kind == "linen" else NnxRoIPool
    with pytest.raises(ValueError, match=next(iter(bad))):
        make(args.pop("output_size"), args.pop("spatial_scale"), **args)


class LinenTiny(nn.Module):
    """conv (stride 2) -> RoIPool -> dense: a tiny detector head."""

    @nn.compact
    def __call__(self, images, boxes):
        x = nn.Conv(4, (3, 3), strides=2)(images)
        x = LinenRoIPool(POOLED, SCALE)(x, boxes)
        return nn.Dense(2)(x.reshape(x.shape[:2] + (-1,)))


class NnxTiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(C, 4, (3, 3), strides=2, rngs=rngs)
        self.pool = NnxRoIPool(POOLED, SCALE)
        self.fc = nnx.Linear(POOLED[0] * POOLED[1] * 4, 2, rngs=rngs)

    def __call__(self, images, boxes):
        x = self.pool(self.conv(images), boxes)
        return self.fc(x.reshape(x.shape[:2] + (-1,)))


def tiny_inputs():
    rng = np.random.default_rng(6)
    images = rng.standard_normal((N, 2 * H, 2 * W, C)).astype(np.float32)
    # Boxes in image pixels; SCALE maps the stride-2 conv output back to pixels / 4.
    xy = rng.uniform(0, W, (N, 5, 2))
    wh = rng.uniform(4, W, (N, 5, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    return images, boxes


def check_conv_grads(grads, kernel):
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert np.any(np.asarray(kernel) != 0), "the gradient must reach the conv through RoIPool"


def test_linen_grad_through_conv():
    images, boxes = tiny_inputs()
    model = LinenTiny()
    params = model.init(jax.random.key(0), images, boxes)["params"]

    @jax.jit
    def loss(p, x, b):
        return jnp.sum(model.apply({"params": p}, x, b) ** 2)

    grads = jax.jit(jax.grad(loss))(params, images, boxes)
    check_conv_grads(grads, grads["Conv_0"]["kernel"])
    # Per-example gradients (vmap of grad) through the layer agree with the batch gradient.
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(
        params, images[:, None], boxes[:, None])
    summed = jax.tree_util.tree_map(lambda g: g.sum(0), per_example)
    for a, b in zip(jax.tree_util.tree_leaves(summed), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_nnx_grad_through_conv():
    images, boxes = tiny_inputs()
    model = NnxTiny(nnx.Rngs(0))

    @nnx.jit
    def grad_fn(m, x, b):
        return nnx.grad(lambda m: jnp.sum(m(x, b) ** 2))(m)

    grads = grad_fn(model, images, boxes)
    check_conv_grads(grads, grads["conv"]["kernel"][...])


def test_import_does_not_load_flax():
    code = ("import sys, jax_roipool; "
            "bad = sorted(m for m in sys.modules if m == 'flax' or m.startswith('flax.')); "
            "assert not bad, bad; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
