"""Build the engine named by the settings; backends are imported only when chosen."""
from __future__ import annotations

import dataclasses

from .base import Engine
from .settings import EngineSettings
from .sources import resolve_model


def create_engine(settings: EngineSettings) -> Engine:
    """Validate the settings, fetch the model when it lives on a hub (openxlab://,
    modelscope://, hf://: cached, resumable) and start the backend (`auto`: see auto_backend)."""
    settings = settings.validate().resolved()
    if settings.backend == "api":
        from .api_backend import ApiEngine
        return ApiEngine(settings)
    if settings.backend == "synthetic":
        from .synthetic_backend import SyntheticEngine
        return SyntheticEngine(settings)
    settings = dataclasses.replace(settings, model_path=resolve_model(
        settings.model_path, settings.model_source, settings.cache_dir))
    if settings.backend == "transformers":
        from .transformers_backend import TransformersEngine
        return TransformersEngine(settings)
    from .lmdeploy_backend import LMDeployEngine
    return LMDeployEngine(settings)
