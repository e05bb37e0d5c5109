"""Shared fixtures: the tiny model (built here, nothing downloaded) and real servers on 127.0.0.1."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN_PY = ROOT / ".venv-train" / "bin" / "python"  # the training environment (XTuner, transformers 4.48)


def train_env(*args, cwd=ROOT) -> str:
    """Run the training environment's Python; its stdout, or the test fails with its output."""
    if not TRAIN_PY.exists():
        pytest.fail("no training environment: run scripts/setup_train_env.sh (scripts/test.sh does)")
    r = subprocess.run([str(TRAIN_PY), *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


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
def tiny_internlm2(tmp_path_factory) -> Path:
    """The tiny model in InternLM2's own layout (packed wqkv, auto_map to InternLM2's code copied
    from the installed XTuner, </s> as EOS and <|im_end|> ending a turn)."""
    return load_script("build_tiny_model").build(tmp_path_factory.mktemp("models") / "tiny-internlm2",
                                                 arch="internlm2")


ARCHS = ("qwen2", "internlm2")  # the families our users run: every backend serves a model of each


def tiny_of(request, arch: str) -> Path:
    return request.getfixturevalue("tiny_internlm2" if arch == "internlm2" else "tiny_model")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory, tiny_model) -> Path:
    """A tiny LLaVA (llava-hf layout) around the tiny chat model: random vision tower."""
    return load_script("build_tiny_model").build_llava(tmp_path_factory.mktemp("models") / "tiny-llava", tiny_model)


# -- headless Chromium (Debian's) for the page tests ------------------------------------------
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        b.new_page, b.new_context = _patient(b.new_page), _patient(b.new_context)
        yield b
        b.close()


# Every wait ends at the state it waits for; this only bounds how long a loaded 2-core CI
# machine may take to get there (a fresh-clone run saw a reload take over Playwright's 30 s).
WAIT_MS = 120_000


def _patient(make):
    def made(*args, **kwargs):
        obj = make(*args, **kwargs)
        obj.set_default_timeout(WAIT_MS)
        return obj
    return made


def open_page(page, url: str) -> None:
    """Go to the app and wait until it is interactive: its load event has run (the chat list
    holds the visitor's chat), so the page's inputs have their handlers. Typing before that is
    lost on a loaded machine (seen in CI: an Enter pressed into a page still mounting)."""
    page.goto(url)
    page.wait_for_function("() => document.querySelectorAll('#chat_list input').length > 0")
