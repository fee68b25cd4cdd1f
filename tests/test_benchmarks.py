"""The benchmark scripts' own code, on the CPU: what they compute runs (a GPU
run must not be the first to find a broken script), and the bin-cell count
of bench_gpu.py is right. The timings themselves are never asserted."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

import reference_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_gpu  # noqa: E402
from _workloads import Workload  # noqa: E402


def test_bin_cells_counts_every_cell_of_every_bin():
    wl = Workload("tiny", n=2, c=1, h=9, w=11, r=3, output_size=(2, 3), spatial_scale=0.5)
    rois = np.array([[0, 0, 0, 21, 17],     # the whole map: 9 x 11 cells
                     [1, 2, 4, 9, 11],      # part of it
                     [1, 40, 40, 60, 60]],  # outside: no cell
                    np.float32)
    want = 0
    for roi in rois:  # cells per bin, from the loop reference's own geometry
        geometry = reference_loop.roi_geometry(roi, wl.n, wl.h, wl.w, wl.output_size,
                                               wl.spatial_scale, "fast_rcnn", np.float32)
        _, rows, cols = geometry
        want += sum(max(y1 - y0, 0) for y0, y1 in rows) * sum(max(x1 - x0, 0) for x0, x1 in cols)
    assert want > 9 * 11  # fast_rcnn bins overlap
    assert bench_gpu.bin_cells({"rois": rois}, wl) == want


def test_batched_ad_benchmark_runs():
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "bench_batched_ad.py"), "--batch", "2",
         "--rois", "3", "--rounds", "1", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| vmap(")]
    assert len(table) == 6, proc.stdout  # jvp and vjp; flat NHWC, NCHW; per-image NHWC
