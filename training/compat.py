"""Shims that let XTuner 0.2.0 and transformers 4.48 run beside the CPU build of torch (tests,
CI, the CPU demo). scripts/setup_train_env.sh installs this file as the training venv's
`sitecustomize`, so the torchvision guard holds for every process there; our XTuner launcher
also calls `apply()`. Each shim is a no-op where it is not needed."""
from __future__ import annotations

import importlib.metadata
import sys
import types


def stub_torchvision_ops() -> None:
    """PyPI's torchvision is a CUDA build: beside the CPU torch its C++ ops do not load and
    `import torchvision` (done by transformers and XTuner) dies registering fake kernels for
    them ('operator torchvision::nms does not exist'). Nothing here uses those ops: skip the
    registrations. Reads package versions only, so it costs no torch import."""
    try:
        cpu_torch = "+cpu" in importlib.metadata.version("torch")
        cuda_vision = "+cpu" not in importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return
    if cpu_torch and cuda_vision:
        sys.modules.setdefault("torchvision._meta_registrations",
                               types.ModuleType("torchvision._meta_registrations"))


def apply() -> None:
    stub_torchvision_ops()
    import torch

    # XTuner's model builder calls torch.cpu.is_bf16_supported, which this torch lacks.
    if not hasattr(torch.cpu, "is_bf16_supported"):
        torch.cpu.is_bf16_supported = lambda: False  # type: ignore[attr-defined]


if __name__ == "sitecustomize":
    stub_torchvision_ops()
