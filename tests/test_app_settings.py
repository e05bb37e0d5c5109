"""App settings: flags over env vars over an env file over defaults; clear errors."""
from __future__ import annotations

import pytest

from chat_ui.settings import AppSettings, parse_settings, read_env_file
from infer_engine import InvalidRequest


def test_env_file_env_and_flags(tmp_path):
    f = tmp_path / "app.env"
    f.write_text("# deployment\nENGINE_MODEL_PATH=from-file\nAPP_TITLE='From file'\n"
                 "APP_PORT=9000\nAPP_EXAMPLES=a|b| c \nENGINE_BACKEND=pytorch\n", encoding="utf-8")
    app, engine = parse_settings(["--env-file", str(f), "--port", "7000"], env={"APP_TITLE": "From env"})
    assert (app.title, app.port, engine.model_path, engine.backend) == ("From env", 7000, "from-file", "pytorch")
    assert app.example_list() == ["a", "b", "c"]


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no app.env here
    app, engine = parse_settings(["--model-path", "m"], env={})
    assert app == AppSettings() and app.port == 7860 and engine.model_path == "m"


def test_bad_env_file_line_names_file_and_line(tmp_path):
    f = tmp_path / "app.env"
    f.write_text("APP_TITLE=x\nthis line is wrong\n", encoding="utf-8")
    with pytest.raises(InvalidRequest, match=r"app\.env:2: expected KEY=VALUE"):
        read_env_file(f)


@pytest.mark.parametrize("argv,param", [(["--auth", "nopassword"], "auth"), (["--port", "0"], "port"),
                                        (["--concurrency", "many"], "concurrency")])
def test_bad_app_settings(argv, param, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidRequest) as err:
        parse_settings(["--model-path", "m", *argv], env={})
    assert err.value.param == param


def test_auth_pairs():
    assert AppSettings(auth="a:1,b:2:3").auth_pairs() == [("a", "1"), ("b", "2:3")]
