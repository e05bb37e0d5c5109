"""One chat-engine interface over HF transformers, LMDeploy (TurboMind / PyTorch) and remote
OpenAI-compatible APIs. Importing this package needs neither CUDA nor any backend library."""
from .base import Delta, Engine, Usage
from .errors import (AuthenticationFailed, BackendUnavailable, ContextOverflow, EngineError,
                     InvalidRequest, ModelNotFound)
from .factory import create_engine
from .settings import EngineSettings, SamplingParams, parse_engine_settings

__all__ = ["Delta", "Engine", "Usage", "EngineError", "InvalidRequest", "ContextOverflow",
           "AuthenticationFailed", "ModelNotFound", "BackendUnavailable", "create_engine",
           "EngineSettings", "SamplingParams", "parse_engine_settings"]
