"""Timing and reporting helpers shared by the benchmark scripts.

Framework-neutral on purpose: it imports neither jax nor torch, so the
torchvision worker (which runs in a python without jax) can use it too. A
measured call is a zero-argument function; ``sync`` is a function applied to
its result that returns once the work is done (``jax.block_until_ready`` for
JAX, ``torch.cuda.synchronize`` for CUDA torch, a no-op for CPU torch).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


def _noop(_result: Any) -> None:
    return None


@dataclass
class Timing:
    """Seconds per call of every sample (one sample = ``inner`` back-to-back calls)."""

    samples: list[float] = field(default_factory=list)

    def extend(self, other: "Timing") -> None:
        self.samples.extend(other.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def minimum(self) -> float:
        return min(self.samples)

    def summary(self) -> dict[str, float]:
        s = sorted(self.samples)
        return {
            "median_ms": 1e3 * statistics.median(s),
            "min_ms": 1e3 * s[0],
            "max_ms": 1e3 * s[-1],
            "samples": len(s),
        }


def measure(call: Callable[[], Any], *, sync: Callable[[Any], Any] = _noop, warmup: int = 1,
            repeats: int = 5, inner: int = 1) -> Timing:
    """Times ``call`` after ``warmup`` untimed calls.

    Each of the ``repeats`` samples runs ``call`` ``inner`` times back to back
    (asynchronous dispatch may overlap them), then ``sync`` on the last result,
    and records the elapsed wall-clock time divided by ``inner``.
    """
    for _ in range(warmup):
        sync(call())
    timing = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        result = None
        for _ in range(inner):
            result = call()
        sync(result)
        timing.samples.append((time.perf_counter() - start) / inner)
        del result
    return timing


def calibrate_inner(call: Callable[[], Any], *, sync: Callable[[Any], Any] = _noop,
                    target_s: float = 0.02, max_inner: int = 1000) -> int:
    """Calls per sample so that one sample takes about ``target_s`` (>= 1)."""
    sync(call())
    start = time.perf_counter()
    sync(call())
    once = max(time.perf_counter() - start, 1e-7)
    return int(max(1, min(max_inner, round(target_s / once))))


def measure_interleaved(calls: dict[Any, tuple], *, rounds: int, repeats: int,
                        target_s: float = 0.02) -> dict[Any, list[float]]:
    """calls: name -> (call, sync). Samples per name, rounds interleaved, so that
    a noisy machine's drift affects every name alike."""
    inner = {}
    for name, (call, sync) in calls.items():
        for _ in range(2):  # warm-up: compile, autotune, allocator growth
            sync(call())
        inner[name] = calibrate_inner(call, sync=sync, target_s=target_s)
    samples: dict[Any, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (call, sync) in calls.items():
            samples[name] += measure(call, sync=sync, warmup=1, repeats=repeats,
                                     inner=inner[name]).samples
    return samples


def save_report(text: str, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "env": {k: os.environ[k] for k in sorted(os.environ)
                if k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLIBC_TUNABLES",
                         "LD_PRELOAD", "XLA_PYTHON_CLIENT_PREALLOCATE",
                         "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES",
                         "JAX_ROIPOOL_CPU_ISA") or k.startswith("MALLOC_")},
        "loadavg": load_average(),
        "transparent_hugepage": _read_first("/sys/kernel/mm/transparent_hugepage/enabled"),
    }


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _read_first(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip()
    except OSError:
        return None


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    return f"{ratio:.1f}x" if ratio >= 0.095 else f"{ratio:.2g}x"


def markdown_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """GitHub markdown table; the first ``left`` columns left-aligned, the others right."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            c = str(c)
            out.append(c.ljust(widths[i]) if i < left else c.rjust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(
        "-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def to_json(obj: Any) -> str:
    def default(o):
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if hasattr(o, "tolist"):
            return o.tolist()
        return str(o)

    return json.dumps(obj, indent=2, sort_keys=True, default=default)
