"""Concurrent calls from several Python threads give the serial results."""

from __future__ import annotations

import concurrent.futures as futures
import functools

import jax
import numpy as np
import pytest

import jax_roipool as jrp
from conftest import BINS, LAYOUTS, assert_exact, feature_shape, random_features, random_rois

THREADS = 6
CALLS = 48


def make_job(index):
    """A deterministic (callable, arguments) pair; shapes and settings vary with index."""
    rng = np.random.default_rng(index)
    layout, bins = LAYOUTS[index % 2], BINS[(index // 2) % 2]
    n, h, w, c = 1 + index % 3, 12 + index % 5, 15 + index % 4, 1 + index % 6
    features = random_features(rng, feature_shape(n, h, w, c, layout), np.float32, "ties")
    rois = random_rois(rng, n, h, w, 40 + index, 0.5)
    fn = functools.partial(jrp.roi_pool_with_argmax, output_size=(1 + index % 4, 2 + index % 3),
                           spatial_scale=0.5, layout=layout, bins=bins)
    if index % 3 == 0:
        fn = jax.jit(fn)
    elif index % 3 == 1:
        grad = jax.grad(lambda f, r, forward=fn: jax.numpy.sum(forward(f, r)[0] ** 2))
        fn = lambda f, r: (grad(f, r),)  # noqa: E731
    return fn, features, rois


def run(job):
    fn, features, rois = job
    return [np.asarray(x) for x in fn(features, rois)]


@pytest.mark.parametrize("repeat", range(2))
def test_threads_match_serial(repeat):
    jobs = [make_job(i) for i in range(CALLS)]
    serial = [run(job) for job in jobs]
    # Twice the jobs, shuffled, so that identical computations run side by side.
    order = np.random.default_rng(repeat).permutation(2 * CALLS) % CALLS
    with futures.ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, [jobs[i] for i in order]))
    for i, result in zip(order, results):
        assert len(result) == len(serial[i])
        for got, want in zip(result, serial[i]):
            assert_exact(got, want.astype(np.float64) if want.dtype.kind == "f" else want,
                         f"job {i}")


def test_threads_fresh_compilations():
    # Every thread compiles its own new shapes at the same time.
    def job(i):
        rng = np.random.default_rng(1000 + i)
        features = random_features(rng, (1, 20 + i, 9, 4), np.float32)
        rois = random_rois(rng, 1, 20 + i, 9, 30, 1.0)
        return [np.asarray(x) for x in jrp.roi_pool_with_argmax(features, rois, 3)], \
            (features, rois)

    with futures.ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(job, range(12)))
    for (out, arg), (features, rois) in results:
        want_out, want_arg = jrp.roi_pool_with_argmax(features, rois, 3)
        assert_exact(out, np.asarray(want_out).astype(np.float64))
        assert_exact(arg, np.asarray(want_arg))
