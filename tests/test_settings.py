"""Settings: one set of defaults, flags over env over defaults, clear errors naming the field."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from conftest import ROOT
from infer_engine import EngineSettings, InvalidRequest, SamplingParams
from infer_engine.settings import add_engine_arguments, settings_from_args


def parse(argv, env=None):
    p = argparse.ArgumentParser()
    add_engine_arguments(p)
    return settings_from_args(p.parse_args(argv), env=env or {})


def test_defaults_come_from_the_dataclasses():
    s = parse(["--model-path", "m"])
    assert s == EngineSettings(model_path="m").resolved()


def test_auto_backend_is_lmdeploys_engine_on_a_gpu_else_transformers(monkeypatch, tmp_path):
    import torch

    from infer_engine.settings import auto_backend

    assert EngineSettings().backend == "auto"
    assert parse(["--model-path", "m"]).backend == "transformers"  # this CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_backend(EngineSettings(model_path="m")) == "pytorch"  # LMDeploy is installed here
    assert parse(["--model-path", "m"]).backend == "pytorch"
    # what only the transformers backend does keeps it there
    assert parse(["--model-path", "m", "--bits", "4"]).backend == "transformers"
    assert parse(["--model-path", "m", "--adapter-path", "a"]).backend == "transformers"
    (tmp_path / "config.json").write_text('{"model_type": "llava", "vision_config": {}}')
    assert parse(["--model-path", str(tmp_path)]).backend == "transformers"
    assert parse(["--model-path", "m", "--backend", "transformers"]).backend == "transformers"


def test_flags_override_env_override_defaults():
    env = {"ENGINE_MODEL_PATH": "from-env", "ENGINE_SESSION_LEN": "2048",
           "ENGINE_LMDEPLOY_TP": "2", "ENGINE_API_ESCAPE_CONTROL_TOKENS": "false"}
    s = parse(["--session-len", "1024", "--backend", "pytorch", "--lmdeploy-quant-policy", "8"], env)
    assert s.model_path == "from-env" and s.session_len == 1024 and s.backend == "pytorch"
    assert s.lmdeploy.tp == 2 and s.lmdeploy.quant_policy == 8
    assert s.api.escape_control_tokens is False


@pytest.mark.parametrize("argv,env,field", [
    (["--model-path", "m", "--session-len", "lots"], {}, "session_len"),
    (["--model-path", "m"], {"ENGINE_LMDEPLOY_CACHE_MAX_ENTRY_COUNT": "2"}, "lmdeploy.cache_max_entry_count"),
    (["--model-path", "m", "--lmdeploy-quant-policy", "3"], {}, "lmdeploy.quant_policy"),
    ([], {}, "model_path"),
    (["--model-path", "m"], {"ENGINE_BACKEND": "vllm"}, "backend"),
    (["--model-path", "m"], {"ENGINE_BITS": "3"}, "bits"),
    (["--model-path", "m", "--bits", "4", "--backend", "pytorch"], {}, "bits"),
])
def test_bad_settings_name_the_field(argv, env, field):
    with pytest.raises(InvalidRequest) as err:
        parse(argv, env)
    assert err.value.param == field
    assert field.split(".")[-1] in str(err.value)


def test_api_backend_needs_no_model_path():
    assert parse(["--backend", "api", "--api-base-url", "http://h:1/v1"]).api.base_url == "http://h:1/v1"


def test_sampling_defaults_validate():
    assert SamplingParams().validate().stop == []
    assert SamplingParams(stop="###").validate().stop == ["###"]


def test_help_lists_every_setting_with_its_env_var():
    out = subprocess.run([sys.executable, "-m", "infer_engine.server", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for flag, env in [("--model-path", "ENGINE_MODEL_PATH"), ("--lmdeploy-cache-max-entry-count",
                      "ENGINE_LMDEPLOY_CACHE_MAX_ENTRY_COUNT"), ("--api-base-url", "ENGINE_API_BASE_URL")]:
        assert flag in out and env in out


def test_package_imports_without_backends_or_cuda():
    code = ("import sys, infer_engine; "
            "heavy = [m for m in ('torch', 'transformers', 'lmdeploy', 'openai', 'fastapi') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_older_library_is_one_line_at_start_naming_it(monkeypatch):
    import infer_engine.versions as versions

    monkeypatch.setattr(versions, "version", lambda package: "5.11.0")
    with pytest.raises(InvalidRequest) as err:
        versions.require("transformers", "transformers")
    assert "transformers >= 5.17" in str(err.value) and "5.11.0" in str(err.value) and err.value.param == "backend"

    def missing(package):
        raise versions.PackageNotFoundError(package)

    monkeypatch.setattr(versions, "version", missing)
    versions.require("lmdeploy", "pytorch")  # no metadata (unpacked, as on our GPU host): its __version__

    def not_importable(name):
        raise ImportError(name)

    monkeypatch.setattr(versions.importlib, "import_module", not_importable)
    with pytest.raises(InvalidRequest, match="lmdeploy >= 0.18, which is not installed"):
        versions.require("lmdeploy", "pytorch")
