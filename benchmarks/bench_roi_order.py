"""The pooling order's A/B on jax's default device: RoIs in their own order vs
in ``roi_order`` (by image, then top to bottom).

For each workload, the forward, backward and forward+backward of jax_roipool
(NHWC, or ``--layout NCHW``) are jitted twice, once with the lowering's
``SORT_ROIS_FROM_FEATURE_BYTES`` thresholds for this platform (every
kernel's) forced off and once forced on, and timed in
interleaved rounds (medians of all samples; each sample ~20 ms of
back-to-back calls, then a sync). The RoIs are those of ``_workloads.py``:
batch indices uniform over the images, in no order. The ordered time
includes the sort. Both orders' outputs and gradients are checked to be the
same before timing (the cotangent is dyadic: sums exact in any order).

    python benchmarks/bench_roi_order.py             # prints the table
    python benchmarks/bench_roi_order.py --save      # also results/roi-order-<platform>-<layout>-<date>.md
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
from _workloads import FRCNN, MASKRCNN, Workload, make_arrays  # noqa: E402

# Timed calls: the forward, the backward alone (the forward's residuals
# computed once, outside the timing) and both in one jit.
MODES = {"forward": "fwd", "backward": "bwd", "forward_backward": "fwd+bwd"}

# Fast R-CNN maps of 2, 4 and 8 images (7, 14 and 28 MB of features), the
# Mask R-CNN-like one (28 MB), and 8 images of 256 channels at 100x136 (111 MB).
WORKLOADS = (
    FRCNN,
    Workload("frcnn-n4", n=4, c=256, h=50, w=68, r=2048, output_size=(7, 7)),
    Workload("frcnn-n8", n=8, c=256, h=50, w=68, r=4096, output_size=(7, 7)),
    MASKRCNN,
    Workload("large-c256", n=8, c=256, h=100, w=136, r=4096, output_size=(7, 7),
             min_size=32.0, max_size=800.0),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="samples per round")
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    parser.add_argument("--layout", choices=("NHWC", "NCHW"), default="NHWC")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    import jax

    from _jaxbench import JaxRoiPool, roi_order_forced, sorts_by_default, versions
    from jax_roipool import _native

    platform = jax.devices()[0].platform
    platform = "cuda" if platform == "gpu" else platform
    chosen = [w for w in WORKLOADS if w.name in args.workloads.split(",")]
    rows = []
    for wl in chosen:
        arrays = make_arrays(wl)
        pools, results = {}, {}
        for on in (False, True):
            pools[on] = JaxRoiPool(arrays, args.layout)
            with roi_order_forced(platform, on):  # traced and compiled now, so run so later
                pools[on].forward()
                pools[on].backward()
                results[on] = pools[on].results()
        for key, value in results[True].items():
            np.testing.assert_array_equal(value, results[False][key], err_msg=key)
        calls = {(on, mode): (pools[on].call(mode), pools[on].sync)
                 for mode in MODES for on in (False, True)}
        samples = _timing.measure_interleaved(calls, rounds=args.rounds, repeats=args.repeats)
        med = {k: float(np.median(v)) for k, v in samples.items()}
        default = "/".join("roi_order" if sorts_by_default(platform, wl.feature_bytes, t)
                           else "own" for t in ("roipool_forward", "roipool_scatter"))
        row = [wl.name, f"{wl.feature_bytes / 1e6:.0f} MB", default]
        for mode in MODES:
            row += [_timing.fmt_ms(med[(False, mode)]), _timing.fmt_ms(med[(True, mode)]),
                    _timing.fmt_ratio(med[(False, mode)] / med[(True, mode)])]
        rows.append(row)
        print(" | ".join(row), flush=True)

    v = versions()
    host = _timing.host_info()
    today = datetime.date.today().isoformat()
    table = _timing.markdown_table(
        ["workload", "features", "default order (fwd/bwd)"]
        + [f"{MODES[mode]} {what}" for mode in MODES for what in ("own ms", "roi_order ms", "gain")],
        rows, left=3)
    text = (f"# Pooling order A/B on {platform}, {today}\n\n"
            f"- jax {v['jax']}, jax_roipool {v['jax_roipool']}, device {v.get('jax_device')}\n"
            f"- host: {host['cpu']}, {host['usable_cpus']} cpus\n"
            f"- {args.layout}, float32; medians of {args.rounds} x {args.repeats} samples, interleaved; "
            f"gain = own / roi_order (the sort included); "
            f"thresholds {_native.SORT_ROIS_FROM_FEATURE_BYTES[platform]}\n\n{table}\n")
    print("\n" + text)
    if args.save:
        _timing.save_report(text, os.path.join(
            HERE, "results", f"roi-order-{platform}-{args.layout.lower()}-{today}.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
