"""GPU benchmark: jax_roipool (CUDA kernels) vs torchvision.ops.roi_pool on the same GPU.

Needs one NVIDIA GPU, jax with CUDA, jax_roipool built with its CUDA kernels,
and torch + torchvision (CUDA) in the same python. Refuses to run otherwise.

Workloads (``_workloads.py``; fixed seed, float32, spatial_scale 1/16):

* frcnn:    N=2, C=256, 50x68 map,  R=1024, 7x7 output (boxes 16..400 px)
* maskrcnn: N=2, C=256, 100x136,    R=1024, 14x14      (boxes 32..800 px)
* large:    N=8, C=512, 100x136,    R=8192, 7x7        (boxes 32..800 px),
  forward only, reported as achieved bandwidth (features read once + output
  written once, divided by the time) as a fraction of the device-to-device
  bandwidth of a large elementwise jnp op measured in the same run.

For frcnn and maskrcnn: jitted forward and forward+backward (``jax.vjp``) of
the native primitive in NHWC and NCHW, NHWC again with the CUDA lowering's
other choice of pooling order (``roi_order`` where the features are below
``SORT_ROIS_FROM_FEATURE_BYTES["cuda"]``, the RoIs' own order above it: the
A/B of that threshold), torchvision (NCHW) forward (no_grad)
and forward+backward (``torch.autograd.grad``), and the pure-jnp fallback
``jax_roipool.reference.roi_pool`` (NHWC; out-of-memory is reported, not
fatal). Results are checked against torchvision bit for bit before timing
(output, argmax, and the feature gradient for a dyadic cotangent, whose sums
are exact in any order); a mismatch aborts the run unless --no-strict.

Timing: every sample runs ``inner`` back-to-back calls (chosen so a sample
takes ~20 ms), then synchronises (``jax.block_until_ready`` /
``torch.cuda.synchronize``) and records wall-clock time / inner; medians over
all samples, ours and torchvision's interleaved round by round.

    python benchmarks/bench_gpu.py    # writes benchmarks/results/gpu-<device>-<date>.md/.json
"""

from __future__ import annotations

import os

# Before jax starts: let torch and jax share the GPU (no 75% preallocation).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _timing  # noqa: E402
from _workloads import FRCNN, LARGE, MASKRCNN, Workload, make_arrays  # noqa: E402

MODES = ("forward", "forward_backward")


def fail(message: str) -> None:
    print(f"\nERROR: {message}\n", file=sys.stderr, flush=True)
    sys.exit(2)


def shrink(wl: Workload) -> Workload:
    """A small version of a workload (for --cpu-smoke-test)."""
    return Workload(wl.name, n=wl.n, c=max(wl.c // 32, 4), h=wl.h, w=wl.w, r=max(wl.r // 32, 16),
                    output_size=wl.output_size, spatial_scale=wl.spatial_scale,
                    min_size=wl.min_size, max_size=wl.max_size, dtype=wl.dtype)


def package_versions() -> dict[str, str]:
    out = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("jax-cuda", "jax_cuda", "nvidia-cuda-runtime", "nvidia-cudnn")):
            out[name] = dist.version
    return dict(sorted(out.items()))


def nvidia_smi() -> str:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return res.stdout.strip() or res.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi unavailable ({e})"


class Env:
    """jax / torch on the GPU (or on the CPU for --cpu-smoke-test), with checks."""

    def __init__(self, cpu_smoke_test: bool):
        import jax
        import torch

        import jax_roipool
        from jax_roipool import _native

        self.jax, self.torch = jax, torch
        self.smoke = cpu_smoke_test
        self.platform = "cpu" if cpu_smoke_test else "cuda"  # of the lowering
        if cpu_smoke_test:
            self.jax_device = jax.devices("cpu")[0]
            self.torch_device = "cpu"
            self.device_name = "cpu-smoke-test"
            return
        try:
            gpus = jax.devices("gpu")
        except RuntimeError as e:
            fail(f"jax sees no GPU ({e}). Install jax with CUDA (e.g. pip install 'jax[cuda13]').")
        if jax.default_backend() != "gpu":
            fail(f"jax's default backend is {jax.default_backend()!r}, not 'gpu'")
        if not torch.cuda.is_available():
            fail("torch.cuda.is_available() is False: torch needs a CUDA build and a GPU")
        if hasattr(_native, "cuda") and _native.cuda is None:
            fail("jax_roipool was built without its CUDA kernels (jax_roipool._cuda missing): "
                 "rebuild with nvcc on PATH: pip install --no-build-isolation --force-reinstall .")
        self.jax_device = gpus[0]
        self.torch_device = "cuda:0"
        self.device_name = torch.cuda.get_device_name(0)
        jax_name = gpus[0].device_kind
        if jax_name.split()[-1:] != self.device_name.split()[-1:] and \
                jax_name not in self.device_name and self.device_name not in jax_name:
            print(f"warning: jax device {jax_name!r} vs torch device {self.device_name!r}")
        del jax_roipool

    def versions(self) -> dict:
        import torchvision

        from _jaxbench import versions

        v = versions()
        v.update({"torch": self.torch.__version__, "torchvision": torchvision.__version__,
                  "torch_cuda": str(self.torch.version.cuda)})
        v.update(package_versions())
        if not self.smoke:
            v["nvidia-smi"] = nvidia_smi()
        return v


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return any(w in text for w in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                   "OutOfMemory"))


def run_reference(env: Env, arrays, mode: str, repeats: int) -> dict:
    """Pure-jnp fallback: {"samples": [...]} or {"status": "OOM" | "error", "detail"}."""
    from _jaxbench import JaxRoiPool

    bench = None
    try:
        bench = JaxRoiPool(arrays, "NHWC", "reference", env.jax_device)
        call = bench.call(mode)
        start = time.perf_counter()
        bench.sync(call())
        first = time.perf_counter() - start
        inner = 1 if first > 0.05 else _timing.calibrate_inner(call, sync=bench.sync)
        if first > 5.0:  # very slow: keep the run short
            repeats = min(repeats, 2)
        t = _timing.measure(call, sync=bench.sync, warmup=1, repeats=repeats, inner=inner)
        return {"samples": t.samples, "first_call_s": first}
    except Exception as e:  # noqa: BLE001 - OOM and friends are results here
        status = "OOM" if is_oom(e) else "error"
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if status == "error":
            traceback.print_exc()
        return {"status": status, "detail": detail}
    finally:
        del bench


def check(env: Env, ours: dict, theirs, arrays, wl: Workload, strict: bool) -> dict:
    from _jaxbench import compare

    ref = theirs.results()
    report = {layout: compare(b.results(), ref, arrays["rois"], wl.h, wl.w)
              for layout, b in ours.items()}
    text = "; ".join(f"{layout}: " + ", ".join(f"{k} {s}" for k, s in rep.items())
                     for layout, rep in report.items())
    print(f"  check vs torchvision: {text}", flush=True)
    if any("MISMATCH" in s for rep in report.values() for s in rep.values()):
        if strict:
            fail(f"{wl.name}: jax_roipool differs from torchvision.ops.roi_pool ({text}); "
                 "rerun with --no-strict to time anyway")
        print("  WARNING: results differ from torchvision; timing anyway (--no-strict)")
    return report


# Our variants: layout -> (name in the results, label in the table).
VARIANTS = {"NHWC": "native NHWC", "NCHW": "native NCHW", "NHWC other order": "native NHWC*"}


def implementations(platform: str, wl: Workload,
                    reference: bool) -> list[tuple[str, str, str]]:
    """Rows of a workload's table: (name in the results, label, layout)."""
    from _jaxbench import sorts_by_default

    other = ("jax_roipool, RoIs in their own order" if sorts_by_default(platform, wl.feature_bytes)
             else "jax_roipool, RoIs in roi_order")
    rows = [(name, other if name.endswith("*") else "jax_roipool", layout.split()[0])
            for layout, name in VARIANTS.items()]
    if reference:
        rows.append(("reference NHWC", "jax_roipool.reference (jnp)", "NHWC"))
    return rows + [("torchvision NCHW", "torchvision", "NCHW")]


def bench_workload(env: Env, wl: Workload, args, with_backward: bool = True) -> dict:
    from _jaxbench import JaxRoiPool, roi_order_forced, sorts_by_default
    from _torchvision_worker import TorchRoiPool

    print(f"\n{wl.describe()}", flush=True)
    arrays = make_arrays(wl, seed=args.seed, cotangent=with_backward)
    ours = {layout: JaxRoiPool(arrays, layout.split()[0], "native", env.jax_device)
            for layout in VARIANTS}
    other = not sorts_by_default(env.platform, wl.feature_bytes)
    with roi_order_forced(env.platform, other):  # every call compiled now, so run so later
        ours["NHWC other order"].forward()
        ours["NHWC other order"].results()
    if not env.smoke:
        for layout, b in ours.items():
            targets = b.custom_call_targets()
            if "roipool_forward" not in targets:
                fail(f"{wl.name} {layout}: no roipool_forward custom call in the lowered "
                     f"program (found {sorted(targets)}): not running the CUDA kernels")
    theirs = TorchRoiPool(arrays["features"], arrays["rois"], wl.output_size, wl.spatial_scale,
                          arrays.get("cotangent"), device=env.torch_device)
    result = {"workload": wl.describe(), "bin_cells": bin_cells(arrays, wl),
              "checks": check(env, ours, theirs, arrays, wl, not args.no_strict)}
    modes = MODES if with_backward else ("forward",)
    calls = {}
    for mode in modes:
        for layout, b in ours.items():
            calls[f"{VARIANTS[layout]} {mode}"] = (b.call(mode), b.sync)
        calls[f"torchvision NCHW {mode}"] = (getattr(theirs, mode), theirs.sync)
    samples = _timing.measure_interleaved(calls, rounds=args.rounds, repeats=args.repeats,
                                  target_s=args.sample_ms / 1e3)
    result["samples_s"] = samples
    result["median_s"] = {k: float(np.median(v)) for k, v in samples.items()}
    for k, v in result["median_s"].items():
        print(f"  {k:32s} {_timing.fmt_ms(v):>9s} ms", flush=True)
    del ours, theirs, calls
    return result


def copy_bandwidth(env: Env, nbytes: int, repeats: int) -> dict:
    """Device-to-device bandwidth of y = 2 * x (bytes read + bytes written) / time."""
    import jax
    import jax.numpy as jnp

    n = nbytes // 4
    x = jax.device_put(jnp.arange(n, dtype=jnp.float32), env.jax_device)
    scale = jax.jit(lambda a: a * 2.0)
    t = _timing.measure(lambda: scale(x), sync=jax.block_until_ready, warmup=3,
                        repeats=repeats)
    jax_bw = 2 * n * 4 / t.median
    out = {"bytes": 2 * n * 4, "jax_s": t.median, "jax_bytes_per_s": jax_bw}
    del x
    torch = env.torch
    src = torch.empty(n, dtype=torch.float32, device=env.torch_device)
    dst = torch.empty_like(src)
    sync = (lambda _r: torch.cuda.synchronize()) if not env.smoke else (lambda _r: None)
    t2 = _timing.measure(lambda: dst.copy_(src), sync=sync, warmup=3, repeats=repeats)
    out.update({"torch_copy_s": t2.median, "torch_copy_bytes_per_s": 2 * n * 4 / t2.median})
    del src, dst
    if not env.smoke:
        torch.cuda.empty_cache()
    return out


def bin_cells(arrays: dict, wl: Workload) -> int:
    """Feature cells summed over every bin of every RoI (``fast_rcnn`` bins, the
    kernels' own geometry): what a forward reads per channel, counting a cell
    once for every bin that covers it."""
    from jax_roipool.reference import _axis_spans

    rois = np.asarray(arrays["rois"], np.float32)
    scaled = rois[:, 1:] * np.float32(wl.spatial_scale)
    ph, pw = wl.output_size
    y0, y1, y_fits = _axis_spans(scaled[:, 1], scaled[:, 3], ph, wl.h, "fast_rcnn")
    x0, x1, x_fits = _axis_spans(scaled[:, 0], scaled[:, 2], pw, wl.w, "fast_rcnn")
    rows = np.maximum(np.asarray(y1) - np.asarray(y0), 0).sum(axis=1, dtype=np.int64)
    cols = np.maximum(np.asarray(x1) - np.asarray(x0), 0).sum(axis=1, dtype=np.int64)
    valid = np.asarray(y_fits & x_fits)  # the others' bins are empty
    return int((rows * cols * valid).sum())


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="samples per round")
    parser.add_argument("--sample-ms", type=float, default=20.0,
                        help="target duration of one sample (back-to-back calls)")
    parser.add_argument("--reference-repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--copy-gib", type=float, default=1.0,
                        help="array size of the bandwidth measurement (default 1 GiB)")
    parser.add_argument("--no-strict", action="store_true",
                        help="time even if results differ from torchvision")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--results-dir", default=None,
                        help="where to write gpu-<device>-<date>.md/.json (default "
                             "benchmarks/results; --cpu-smoke-test writes only if given)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--cpu-smoke-test", action="store_true",
                        help="testing this script without a GPU: shrunken workloads on the "
                             "CPU; nothing is saved unless --results-dir is given")
    args = parser.parse_args()
    if args.seed is None:
        from _workloads import SEED

        args.seed = SEED
    today = datetime.date.today().isoformat()

    env = Env(args.cpu_smoke_test)
    versions = env.versions()
    host = _timing.host_info()
    print(f"# jax_roipool GPU benchmark, {today}, {env.device_name}")
    for k, v in versions.items():
        print(f"  {k}: {v}")

    workloads = [FRCNN, MASKRCNN] + ([] if args.skip_large else [LARGE])
    if args.cpu_smoke_test:
        workloads = [shrink(w) for w in workloads]
    info = {"date": today, "device": env.device_name, "platform": env.platform,
            "versions": versions, "host": host,
            "args": vars(args), "workloads": {}}

    for wl in workloads:
        info["workloads"][wl.name] = bench_workload(env, wl, args,
                                                    with_backward=wl.name != "large")
        if not env.smoke:
            env.torch.cuda.empty_cache()

    large = next((w for w in workloads if w.name == "large"), None)
    if large is not None:
        nbytes = int(args.copy_gib * 2**30) if not env.smoke else 2**24
        info["copy"] = copy_bandwidth(env, nbytes, repeats=args.repeats)
        bw = info["copy"]["jax_bytes_per_s"]
        print(f"\ndevice copy (y = 2 * x, jnp): {bw / 1e9:.0f} GB/s; torch copy_: "
              f"{info['copy']['torch_copy_bytes_per_s'] / 1e9:.0f} GB/s")

    # The fallback last: an OOM attempt can leave jax's allocator holding memory.
    if not args.skip_reference:
        for wl in workloads:
            if wl.name == "large":
                continue
            arrays = make_arrays(wl, seed=args.seed)
            for mode in MODES:
                print(f"\npure-jnp reference, {wl.name} {mode} ...", flush=True)
                r = run_reference(env, arrays, mode, args.reference_repeats)
                info["workloads"][wl.name].setdefault("reference", {})[mode] = r
                print("  " + (f"median {_timing.fmt_ms(float(np.median(r['samples'])))} ms"
                              if "samples" in r else f"{r['status']}: {r['detail']}"), flush=True)

    markdown = report(info, workloads, args)
    print("\n" + markdown)
    if args.results_dir is None and not args.cpu_smoke_test:
        args.results_dir = os.path.join(HERE, "results")
    if not args.no_save and args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        stem = os.path.join(args.results_dir, f"gpu-{device_slug(env.device_name)}-{today}")
        with open(stem + ".md", "w", encoding="utf-8") as f:
            f.write(markdown)
        with open(stem + ".json", "w", encoding="utf-8") as f:
            f.write(_timing.to_json(info) + "\n")
        print(f"wrote {stem}.md and {stem}.json")
    return 0


def report(info: dict, workloads: list[Workload], args) -> str:
    v = info["versions"]
    lines = [f"# jax_roipool GPU benchmark: {info['device']}, {info['date']}", ""]
    lines.append("- " + ", ".join(f"{k} {v[k]}" for k in
                                  ("jax", "jaxlib", "jax_roipool", "cuda_channels_per_thread",
                                   "torch", "torchvision", "torch_cuda", "numpy") if k in v))
    extra = {k: x for k, x in v.items() if k.startswith(("jax-cuda", "jax_cuda", "nvidia"))}
    if extra:
        lines.append("- " + ", ".join(f"{k} {x}" for k, x in extra.items()))
    lines.append(f"- host: {info['host']['cpu']}, {info['host']['usable_cpus']} cpus; "
                 f"jax device {v.get('jax_device', '?')}")
    lines.append(f"- timing: median of {args.rounds} x {args.repeats} samples, each "
                 f"~{args.sample_ms:g} ms of back-to-back calls then a device sync, wall clock; "
                 "ours and torchvision interleaved; speed-up = torchvision / ours")
    lines.append("")

    rows = []
    for wl in workloads:
        if wl.name == "large":
            continue
        res = info["workloads"][wl.name]
        med = res["median_s"]
        ref = res.get("reference", {})

        def t(name, mode):
            return med.get(f"{name} {mode}")

        for name, label, layout in implementations(info["platform"], wl, reference=True):
            cells = []
            ratios = []
            for mode in MODES:
                if name.startswith("reference"):
                    r = ref.get(mode)
                    if r is None:
                        cells.append("skipped")
                        ratios.append("n/a")
                        continue
                    if "samples" not in r:
                        cells.append(r["status"])
                        ratios.append("n/a")
                        continue
                    ours = float(np.median(r["samples"]))
                else:
                    ours = t(name, mode)
                base = t("torchvision NCHW", mode)
                cells.append(_timing.fmt_ms(ours))
                ratios.append(_timing.fmt_ratio(base / ours if ours and base else None))
            rows.append([wl.name, label, layout] + cells + ratios)
    lines.append(_timing.markdown_table(
        ["workload", "implementation", "layout", "forward ms", "fwd+bwd ms", "fwd speed-up",
         "fwd+bwd speed-up"], rows, left=3))
    lines.append("")
    for wl in workloads:
        lines.append(f"- {wl.describe()}")
    lines.append("")

    checks = []
    for wl in workloads:
        res = info["workloads"][wl.name]
        for layout, rep in res["checks"].items():
            checks.append(f"{wl.name} {layout}: " + ", ".join(f"{k} {s}" for k, s in rep.items()))
    lines += ["Checked against torchvision before timing:", ""] + [f"- {c}" for c in checks] + [""]

    large = next((w for w in workloads if w.name == "large"), None)
    if large is not None and "copy" in info:
        res = info["workloads"]["large"]
        bw = info["copy"]["jax_bytes_per_s"]
        moved = large.feature_bytes + large.output_bytes
        itemsize = np.dtype(large.dtype).itemsize
        binned = res["bin_cells"] * large.c * itemsize + large.output_bytes

        def gbps(rate):
            return (f"{rate / 1e9:.0f}" if rate >= 10e9 else f"{rate / 1e9:.2g}") if rate else "n/a"

        rows = []
        for name, label, layout in implementations(info["platform"], large, reference=False):
            s = res["median_s"].get(f"{name} forward")
            rate = moved / s if s else None
            rows.append([label, layout, _timing.fmt_ms(s), gbps(rate),
                         f"{rate / bw:.0%}" if rate else "n/a",
                         gbps(binned / s if s else None)])
        lines += [f"Large workload, forward: {large.describe()}", "",
                  f"Bytes = features read once + output written once = "
                  f"{moved / 1e6:.0f} MB (jax_roipool.roi_pool writes no argmax; "
                  f"torchvision's forward also writes one, not counted). Device copy bandwidth (jitted y = 2 * x on "
                  f"{info['copy']['bytes'] / 2 / 2**30:g} GiB, read + write): "
                  f"{bw / 1e9:.0f} GB/s (torch copy_: "
                  f"{info['copy']['torch_copy_bytes_per_s'] / 1e9:.0f} GB/s). "
                  f"The bins themselves cover {binned / 1e9:.1f} GB (every cell counted once "
                  f"per bin that holds it, plus the output; overlapping RoIs read each "
                  f"feature element {res['bin_cells'] * large.c * itemsize / large.feature_bytes:.0f} "
                  f"times on average), read through the caches: the last column.", "",
                  _timing.markdown_table(["implementation", "layout", "forward ms", "GB/s",
                                          "of copy bandwidth", "bins GB/s"], rows, left=2),
                  ""]
    if "nvidia-smi" in v:
        lines.append(f"nvidia-smi: {v['nvidia-smi']}")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
