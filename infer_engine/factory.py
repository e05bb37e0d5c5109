"""Build the engine named by the settings; backends are imported only when chosen."""
from __future__ import annotations

from .base import Engine
from .settings import EngineSettings


def create_engine(settings: EngineSettings) -> Engine:
    settings.validate()
    if settings.backend == "transformers":
        from .transformers_backend import TransformersEngine
        return TransformersEngine(settings)
    if settings.backend in ("turbomind", "pytorch"):
        from .lmdeploy_backend import LMDeployEngine
        return LMDeployEngine(settings)
    from .api_backend import ApiEngine
    return ApiEngine(settings)
