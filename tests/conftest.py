"""Shared fixtures: the tiny model (built here, nothing downloaded) and real servers on 127.0.0.1."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the XTuner end-to-end run and the browser tests "
                                       "(pytest -m 'not slow' for a fast inner loop)")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return load_script("build_tiny_model").build(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory, tiny_model) -> Path:
    """A tiny LLaVA (llava-hf layout) around the tiny chat model: random vision tower."""
    return load_script("build_tiny_model").build_llava(tmp_path_factory.mktemp("models") / "tiny-llava", tiny_model)
