"""torchvision.ops.roi_pool side of the benchmarks.

Two uses:

* As a library (``from _torchvision_worker import TorchRoiPool``), in a python
  where torch and torchvision work (bench_gpu.py).
* As a persistent worker process (bench_cpu.py), run with a python that has a
  working torchvision (e.g. /work/main/.venv-torch/bin/python), which need not
  have jax::

      python _torchvision_worker.py --data workload.npz [--device cpu] [--threads N]

  ``workload.npz`` holds ``features`` [N, C, H, W], ``rois`` [R, 5] (same
  dtype), ``cotangent`` [R, C, PH, PW], ``output_size`` [2] and
  ``spatial_scale`` (0-d). The worker answers one JSON object per line on
  stdout to each JSON command line on stdin:

      {"cmd": "info"}                      -> versions, threads, device
      {"cmd": "save", "path": P}           -> writes output, argmax and
                                              grad_features (for the workload's
                                              cotangent) to the .npz P
      {"cmd": "time", "mode": "forward" | "forward_backward",
       "warmup": W, "repeats": K, "inner": I} -> {"samples": [seconds, ...]}
      {"cmd": "quit"}

  Errors are answered as {"error": "..."}; the worker then keeps serving.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import measure  # noqa: E402


class TorchRoiPool:
    """torchvision.ops.roi_pool on fixed inputs (NCHW), for checking and timing."""

    def __init__(self, features: np.ndarray, rois: np.ndarray, output_size, spatial_scale: float,
                 cotangent: np.ndarray | None = None, device: str = "cpu"):
        import torch
        import torchvision
        from torchvision.ops import roi_pool

        self.torch, self.torchvision, self._roi_pool = torch, torchvision, roi_pool
        self.device = torch.device(device)
        self.features = torch.from_numpy(np.ascontiguousarray(features)).to(self.device)
        self.rois = torch.from_numpy(np.ascontiguousarray(rois)).to(self.device,
                                                                    self.features.dtype)
        self.cotangent = (None if cotangent is None else
                          torch.from_numpy(np.ascontiguousarray(cotangent)).to(self.device))
        self.output_size = tuple(int(s) for s in output_size)
        self.spatial_scale = float(spatial_scale)
        self._grad_input = self.features.detach().clone().requires_grad_(True)

    def sync(self, _result=None) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def forward(self):
        with self.torch.no_grad():
            return self._roi_pool(self.features, self.rois, self.output_size, self.spatial_scale)

    def forward_backward(self):
        """(output, d(sum(output * cotangent)) / d features), like our jitted vjp."""
        out = self._roi_pool(self._grad_input, self.rois, self.output_size, self.spatial_scale)
        (grad,) = self.torch.autograd.grad(out, self._grad_input, self.cotangent)
        return out, grad

    def forward_with_argmax(self):
        with self.torch.no_grad():
            return self.torch.ops.torchvision.roi_pool(self.features, self.rois,
                                                       self.spatial_scale, *self.output_size)

    def results(self) -> dict[str, np.ndarray]:
        """output, argmax (torchvision's: h * W + w in the image plane), grad_features."""
        out, argmax = self.forward_with_argmax()
        arrays = {"output": out.cpu().numpy(), "argmax": argmax.cpu().numpy().astype(np.int32)}
        if self.cotangent is not None:
            arrays["grad_features"] = self.forward_backward()[1].cpu().numpy()
        return arrays

    def time(self, mode: str, warmup: int = 1, repeats: int = 5, inner: int = 1) -> list[float]:
        call = {"forward": self.forward, "forward_backward": self.forward_backward}[mode]
        return measure(call, sync=self.sync, warmup=warmup, repeats=repeats,
                       inner=inner).samples

    def info(self) -> dict:
        torch = self.torch
        info = {"torch": torch.__version__, "torchvision": self.torchvision.__version__,
                "torch_threads": torch.get_num_threads(),
                "torch_interop_threads": torch.get_num_interop_threads(),
                "device": str(self.device), "python": sys.executable}
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
            info["cuda"] = torch.version.cuda
        return info


def _serve(worker: TorchRoiPool) -> None:
    def reply(obj) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, **worker.info()})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            name = cmd.get("cmd")
            if name == "quit":
                reply({"bye": True})
                return
            if name == "info":
                reply(worker.info())
            elif name == "save":
                np.savez(cmd["path"], **worker.results())
                reply({"saved": cmd["path"]})
            elif name == "time":
                samples = worker.time(cmd["mode"], int(cmd.get("warmup", 1)),
                                      int(cmd.get("repeats", 5)), int(cmd.get("inner", 1)))
                reply({"samples": samples})
            else:
                reply({"error": f"unknown command {name!r}"})
        except Exception as e:  # keep serving; the caller decides
            reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="workload .npz")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with np.load(args.data) as d:
        worker = TorchRoiPool(d["features"], d["rois"], d["output_size"],
                              float(d["spatial_scale"]), d["cotangent"], device=args.device)
    _serve(worker)


if __name__ == "__main__":
    main()
