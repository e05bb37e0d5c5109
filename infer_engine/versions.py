"""The lowest versions of the libraries each backend relies on, checked once at start-up: an
older library is one clear line naming it, never an error on every request.

transformers 5.17: the GPU host's (continuous batching with per-request sampling, its
checkpoint conversion mapping for InternLM2, StaticCache(config, max_cache_len), `dtype=`).
LMDeploy 0.18: the one run here (`pipeline().session()`, `stream_infer(sessions=...)`).
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

from .errors import InvalidRequest

MINIMUM = {"transformers": (5, 17), "lmdeploy": (0, 18)}


def require(package: str, backend: str) -> None:
    """Raise InvalidRequest (param backend) when `package` is missing or older than MINIMUM."""
    want = ".".join(map(str, MINIMUM[package]))
    try:
        have = version(package)
    except PackageNotFoundError:  # a package unpacked without its metadata (our GPU host's LMDeploy)
        try:
            have = str(importlib.import_module(package).__version__)
        except (ImportError, AttributeError):
            raise InvalidRequest(f"the {backend} backend needs {package} >= {want}, which is not installed "
                                 f"(pip install -r requirements.txt)", param="backend") from None
    parts = []
    for piece in have.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < MINIMUM[package]:
        raise InvalidRequest(f"the {backend} backend needs {package} >= {want}, this environment has {have}: "
                             "upgrade it (pip install -r requirements.txt)", param="backend")
