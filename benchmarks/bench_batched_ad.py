"""Batched JVPs and VJPs at shared features on jax's default device: a vmap
over tangents or cotangents alone (what jacfwd and jacrev do), with the
features read in place vs copied once per batch element.

The gather (JVP) and scatter (VJP) kernels pool the shared features and read
the tangent, or write the gradient, of every batch element, which their
source or gradient holds as copies of the images ("shared"). The baseline
maps a broadcast copy of the features along with the tangents ("copied"):
the batching rule then folds each element's own copy into the images, as it
did for every such vmap before the kernels took copies. Both are jitted in
the same process, checked to agree exactly (the values are dyadic, so the
sums are exact in any order), and timed in interleaved rounds (medians of
all samples; each sample ~20 ms of back-to-back calls). "temp MB" is the
compiled program's scratch memory (``memory_analysis``), where the copies go.

    python benchmarks/bench_batched_ad.py            # prints the table
    python benchmarks/bench_batched_ad.py --save     # also results/batched-ad-<platform>-<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _timing  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="tangents or cotangents")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--rois", type=int, default=256, help="per image for per-image boxes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="samples per round")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    import jax_roipool as jrp
    from _jaxbench import versions

    b, n, c, h, w, r, pooled, scale = args.batch, args.images, 256, 50, 68, args.rois, 7, 1 / 16
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 16 * min(h, w), (n, r, 2)).astype(np.float32)
    sizes = rng.uniform(16, 400, (n, r, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + sizes], -1)
    flat = np.concatenate([np.repeat(np.arange(n, dtype=np.float32), r)[:, None],
                           boxes.reshape(-1, 4)], 1)
    rows = []
    for form, layout, where in (("flat", "NHWC", flat), ("flat", "NCHW", flat),
                                ("per-image", "NHWC", boxes)):
        shape = (n, h, w, c) if layout == "NHWC" else (n, c, h, w)
        features = jnp.asarray(rng.integers(-64, 64, shape).astype(np.float32) / 8)
        pool = lambda x: jrp.roi_pool(x, where, pooled, scale, layout=layout)  # noqa: E731
        out_shape = jax.eval_shape(pool, features).shape
        tangents = jnp.asarray(rng.integers(-16, 16, (b,) + shape).astype(np.float32) / 8)
        cotangents = jnp.asarray(rng.integers(-16, 16, (b,) + out_shape).astype(np.float32) / 8)

        def jvps(x, t):
            return jax.vmap(lambda t: jax.jvp(pool, (x,), (t,))[1])(t)

        def vjps(x, ct):
            back = jax.vjp(pool, x)[1]
            return jax.vmap(lambda ct: back(ct)[0])(ct)

        for op, fn, batch in (("vmap(jvp)", jvps, tangents), ("vmap(vjp)", vjps, cotangents)):
            shared = jax.jit(fn)
            # The baseline: every batch element maps its own copy of the features.
            copied = jax.jit(lambda x, t, fn=fn: jax.vmap(
                lambda xi, ti: fn(xi, ti[None])[0])(jnp.broadcast_to(x, (b,) + x.shape), t))
            results = {name: np.asarray(f(features, batch))
                       for name, f in (("shared", shared), ("copied", copied))}
            np.testing.assert_array_equal(results["shared"], results["copied"])
            temp = {name: f.lower(features, batch).compile().memory_analysis()
                    for name, f in (("shared", shared), ("copied", copied))}
            calls = {name: (lambda f=f: f(features, batch), jax.block_until_ready)
                     for name, f in (("shared", shared), ("copied", copied))}
            samples = _timing.measure_interleaved(calls, rounds=args.rounds,
                                                  repeats=args.repeats)
            med = {k: float(np.median(v)) for k, v in samples.items()}
            mb = {k: (getattr(m, "temp_size_in_bytes", 0) / 1e6 if m is not None else None)
                  for k, m in temp.items()}
            row = [op, form, layout, _timing.fmt_ms(med["copied"]), _timing.fmt_ms(med["shared"]),
                   _timing.fmt_ratio(med["copied"] / med["shared"]),
                   *(f"{mb[k]:.1f}" if mb[k] is not None else "n/a" for k in ("copied", "shared"))]
            rows.append(row)
            print(" | ".join(row), flush=True)

    v = versions()
    host = _timing.host_info()
    today = datetime.date.today().isoformat()
    platform = jax.devices()[0].platform
    table = _timing.markdown_table(
        ["op", "rois", "layout", "copied ms", "shared ms", "speed-up", "copied temp MB",
         "shared temp MB"], rows, left=3)
    text = (f"# Batched JVPs and VJPs at shared features on {platform}, {today}\n\n"
            f"- jax {v['jax']}, jax_roipool {v['jax_roipool']}, device {v.get('jax_device')}\n"
            f"- host: {host['cpu']}, {host['usable_cpus']} cpus\n"
            f"- float32, N={n}, C={c}, {h}x{w}, {r} RoIs per image, {pooled}x{pooled}, "
            f"batch {b}; medians of {args.rounds} x {args.repeats} samples, interleaved; "
            f"speed-up = copied / shared\n\n{table}\n")
    print("\n" + text)
    if args.save:
        _timing.save_report(text, os.path.join(HERE, "results",
                                               f"batched-ad-{platform}-{today}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
