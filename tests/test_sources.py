"""Model sources: resolution logic, a real git clone from a local repository standing in for
OpenXLab's git server, and the error paths (only loopback addresses are contacted)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from infer_engine.server import free_port
from infer_engine.sources import ModelSourceError, parse_model_ref, resolve_model


def test_parse_model_refs(tmp_path):
    assert parse_model_ref(str(tmp_path)) == ("local", str(tmp_path))
    assert parse_model_ref("openxlab://OpenLMLab/internlm2-chat-1_8b") == \
        ("openxlab", "OpenLMLab/internlm2-chat-1_8b")
    assert parse_model_ref("ms://Shanghai_AI_Laboratory/internlm2-chat-7b") == \
        ("modelscope", "Shanghai_AI_Laboratory/internlm2-chat-7b")
    assert parse_model_ref("hf://internlm/internlm2-chat-1_8b")[0] == "huggingface"
    assert parse_model_ref("internlm/internlm2-chat-1_8b", "modelscope")[0] == "modelscope"


@pytest.mark.parametrize("ref,match", [
    ("ftp://a/b", "unknown model source 'ftp'"),
    ("no/such/local/folder/x", "neither a local folder nor an 'owner/name' model id"),
    ("hf://justaname", "neither a local folder"),
])
def test_bad_refs_are_clear(ref, match):
    with pytest.raises(ModelSourceError, match=match):
        parse_model_ref(ref)


@pytest.fixture
def git_server(tmp_path, tiny_model, monkeypatch):
    """A bare repository holding the tiny model, served to git over file://."""
    work = tmp_path / "work"
    shutil.copytree(tiny_model, work)
    run = lambda *a: subprocess.run(["git", *a], cwd=work, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    run("add", "-A")
    run("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "model")
    (tmp_path / "srv" / "owner").mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(tmp_path / "srv/owner/tiny.git")], check=True)
    monkeypatch.setenv("OPENXLAB_GIT_BASE", f"file://{tmp_path / 'srv'}")
    return tmp_path


def test_openxlab_clone_is_cached_and_complete(git_server, tmp_path):
    cache = tmp_path / "cache"
    path = resolve_model("openxlab://owner/tiny", cache_dir=str(cache))
    assert (cache / "openxlab/owner/tiny/model.safetensors").exists()
    assert path == str(cache / "openxlab/owner/tiny")
    assert not (cache / "openxlab/owner/tiny.partial").exists()
    shutil.rmtree(git_server / "srv")  # cached: no second download
    assert resolve_model("openxlab://owner/tiny", cache_dir=str(cache)) == path


def test_interrupted_clone_is_resumed_not_restarted(git_server, tmp_path):
    cache = tmp_path / "cache"
    partial = cache / "openxlab/owner/tiny.partial"
    subprocess.run(["git", "clone", "-q", f"file://{git_server}/srv/owner/tiny.git", str(partial)], check=True)
    marker = partial / ".resumed"
    marker.write_text("kept")
    path = resolve_model("openxlab://owner/tiny", cache_dir=str(cache))
    assert (cache / "openxlab/owner/tiny/.resumed").read_text() == "kept"
    assert path.endswith("openxlab/owner/tiny")


def test_openxlab_failure_names_source_and_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENXLAB_GIT_BASE", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ModelSourceError, match=r"^openxlab: git clone http://127\.0\.0\.1:\d+/a/b\.git failed: .+"):
        resolve_model("openxlab://a/b", cache_dir=str(tmp_path))
    assert not any(tmp_path.rglob("b"))  # nothing that looks like a finished model


def test_huggingface_failure_names_source_and_reason(tmp_path):
    with pytest.raises(ModelSourceError, match=r"^huggingface: cannot download 'internlm/x': .+"):
        resolve_model("hf://internlm/x", cache_dir=str(tmp_path),
                      hf_endpoint=f"http://127.0.0.1:{free_port()}")


def test_modelscope_missing_package_is_clear(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    with pytest.raises(ModelSourceError, match="modelscope: the `modelscope` package is not installed"):
        resolve_model("modelscope://a/b", cache_dir=str(tmp_path))


def test_the_engine_fetches_hub_models_for_every_entry_point(git_server, tmp_path):
    """Model resolution lives in create_engine: the server and the terminal chat take
    openxlab:// (modelscope://, hf://) as the app does."""
    from conftest import ROOT
    from infer_engine import EngineSettings, SamplingParams, create_engine

    cache = tmp_path / "cache"
    with create_engine(EngineSettings(model_path="openxlab://owner/tiny", cache_dir=str(cache))) as engine:
        assert engine.chat([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=2))[1].completion_tokens
    assert (cache / "openxlab/owner/tiny/model.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "infer_engine.chat", "openxlab://owner/tiny", "--cache-dir",
                        str(tmp_path / "cache2")], cwd=ROOT, input="/exit\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "chatting with tiny (transformers)" in r.stdout, r.stderr
