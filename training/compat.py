"""Shims that let XTuner 0.2.0 and transformers 4.48 run beside the CPU build of torch (tests,
CI, the CPU demo). scripts/setup_train_env.sh installs this file as the training venv's
`sitecustomize`, so the torchvision guard holds for every process there; our XTuner launcher
also calls `apply()`. Each shim is a no-op where it is not needed."""
from __future__ import annotations

import importlib.metadata
import pickle
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


def allow_xtuner_checkpoints() -> None:
    """torch >= 2.6 loads checkpoints with weights_only=True, which refuses what mmengine puts in
    XTuner's iter_*.pth: the training log's HistoryBuffer, numpy arrays in it, and
    getattr(HistoryBuffer, 'min') for its statistics (so --resume always failed). Allow exactly
    those: a getattr that only hands out HistoryBuffer's own methods, not getattr for everything
    (that would let a crafted file reach any object), and never weights_only=False."""
    import torch
    try:
        import numpy as np
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        return

    def history_buffer_getattr(obj: object, name: str) -> object:
        if obj is HistoryBuffer and isinstance(name, str) and not name.startswith("_") \
                and callable(getattr(HistoryBuffer, name, None)):
            return getattr(HistoryBuffer, name)
        raise pickle.UnpicklingError(f"checkpoint asks for getattr({obj!r}, {name!r}): refused")

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    torch.serialization.add_safe_globals([
        HistoryBuffer, np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar,
        *[type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"],  # numpy 2 pickles dtypes by class
        (history_buffer_getattr, "builtins.getattr")])


def apply() -> None:
    stub_torchvision_ops()
    import torch

    allow_xtuner_checkpoints()

    # XTuner's model builder calls torch.cpu.is_bf16_supported, which this torch lacks.
    if not hasattr(torch.cpu, "is_bf16_supported"):
        torch.cpu.is_bf16_supported = lambda: False  # type: ignore[attr-defined]


if __name__ == "sitecustomize":
    stub_torchvision_ops()
