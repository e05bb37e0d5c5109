"""App settings (flags / APP_* env vars / an optional env file), next to the engine's ENGINE_*."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from infer_engine.errors import InvalidRequest
from infer_engine.images import MAX_IMAGE_BYTES
from infer_engine.settings import (EngineSettings, SamplingParams, add_dataclass_arguments,
                                   add_engine_arguments, dataclass_from_args, settings_from_args)

ENV_PREFIX = "APP_"


def _help(text: str, **kw: object) -> dict:
    return {"help": text, **kw}


@dataclass
class AppSettings:
    host: str = field(default="0.0.0.0", metadata=_help("interface to listen on (127.0.0.1: this machine only)"))
    port: int = field(default=7860, metadata=_help("port (OpenXLab and Docker expect 7860)"))
    title: str = field(default="InternLM Chat", metadata=_help("page title"))
    system_prompt: str = field(default="", metadata=_help("initial system prompt (editable in the page)"))
    examples: str = field(default="你好，请介绍一下你自己|What can you do?|用三句话解释什么是微调",
                          metadata=_help("example questions, separated by |"))
    model_label: str = field(default="", metadata=_help("name shown for the model (default: folder name)"))
    compare_model_path: str = field(default="", metadata=_help(
        "second model for the side-by-side Compare tab, e.g. the base model before fine-tuning "
        "(with --backend api: the remote model's name)"))
    compare_api_base_url: str = field(default="", metadata=_help(
        "with --backend api: the server of the compare model (default: --api-base-url)"))
    compare_label: str = field(default="", metadata=_help("name shown for the compare model"))
    concurrency: int = field(default=0, metadata=_help(
        "replies generated at once; 0: what the backend runs at once (LMDeploy: its batch size)"))
    max_updates_per_s: float = field(default=500.0, metadata=_help(
        "streamed chat updates per second for all users together (each costs a page render)"))
    queue_size: int = field(default=64, metadata=_help("requests waiting at most; more are refused"))
    workers: int = field(default=0, metadata=_help(
        "app processes behind the one port (each visitor kept on one; the chat store is shared); with more "
        "than one, a local model runs in a process of its own (our OpenAI server on 127.0.0.1). 0: auto "
        "(min(4, CPUs / 2) when the model runs on a GPU, else 1)"))
    max_input_chars: int = field(default=4000, metadata=_help("longest message accepted"))
    max_new_tokens: int = field(default=SamplingParams.max_new_tokens,
                                metadata=_help("default reply length (slider)"))
    temperature: float = field(default=SamplingParams.temperature,
                               metadata=_help("default temperature (slider; 0 = greedy)"))
    auth: str = field(default="", metadata=_help("require login: user:pass[,user2:pass2]"))
    history_path: str = field(default=str(Path.home() / ".cache" / "chat-app" / "chats.sqlite3"), metadata=_help(
        "SQLite file of the kept conversations (per browser; survives reloads and restarts)"))
    no_history: bool = field(default=False, metadata=_help(
        "keep conversations in memory only, for the life of the process (nothing on disk)"))
    history_days: float = field(default=30.0, metadata=_help("forget chats not used for this many days (0: never)"))
    history_max_mb: float = field(default=10.0, metadata=_help(
        "kept conversations per browser, in MB; beyond it the oldest chats go"))
    history_max_total_mb: float = field(default=2048.0, metadata=_help(
        "kept conversations of all browsers together, in MB; beyond it the least recently used chats of "
        "idle browsers go first (chats never written to before any other)"))
    upload_mb_per_10min: float = field(default=200.0, metadata=_help(
        "image apps: what one visitor may upload in 10 minutes, in MB (and 40 images); each upload is "
        "checked as an image on arrival"))
    max_image_mb: float = field(default=10.0, metadata=_help(
        "largest image a visitor may add to a message, in MB (image models only; kept scaled to 1024 px)"))

    def validate(self) -> "AppSettings":
        for name in ("port", "queue_size", "max_input_chars", "max_new_tokens", "max_updates_per_s"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be >= 1, got {getattr(self, name)}", param=name)
        if not 0 < self.max_image_mb <= MAX_IMAGE_BYTES / 2**20:  # what an engine takes
            raise InvalidRequest(f"max_image_mb must be in (0, {MAX_IMAGE_BYTES / 2**20:g}], got {self.max_image_mb}",
                                 param="max_image_mb")
        if self.history_max_mb <= 0 or self.history_days < 0 or self.history_max_total_mb < self.history_max_mb:
            raise InvalidRequest("history_max_mb must be > 0, history_max_total_mb at least history_max_mb and "
                                 "history_days >= 0", param="history_max_mb")
        if self.workers < 0:
            raise InvalidRequest(f"workers must be >= 0 (0: auto), got {self.workers}", param="workers")
        if self.concurrency < 0:
            raise InvalidRequest(f"concurrency must be >= 0, got {self.concurrency}", param="concurrency")
        if not 0 <= self.temperature <= 2:
            raise InvalidRequest(f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        self.auth_pairs()
        return self

    def example_list(self) -> list[str]:
        return [e.strip() for e in self.examples.split("|") if e.strip()]

    def auth_pairs(self) -> list[tuple[str, str]] | None:
        if not self.auth:
            return None
        pairs = []
        for item in self.auth.split(","):
            user, sep, password = item.partition(":")
            if not sep or not user or not password:
                raise InvalidRequest("auth must look like user:pass[,user2:pass2]", param="auth")
            pairs.append((user, password))
        return pairs


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines (# comments, optional quotes): settings for OpenXLab/Docker in one file."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"{path}:{n}: expected KEY=VALUE, got {line!r}", param="env_file")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
                   ) -> tuple[AppSettings, EngineSettings]:
    parser = argparse.ArgumentParser(
        description="Chat app over any inference engine. Every setting is also an env var "
                    "(APP_* for the app, ENGINE_* for the engine) or a line in --env-file.")
    parser.add_argument("--env-file", default=None,
                        help="KEY=VALUE file of settings (default: app.env when it exists)")
    add_dataclass_arguments(parser, AppSettings, ENV_PREFIX, "app")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    merged = dict(os.environ if env is None else env)
    env_file = args.env_file or ("app.env" if Path("app.env").exists() else None)
    if env_file:
        merged = {**read_env_file(env_file), **merged}  # real env vars win over the file
    app = dataclass_from_args(AppSettings, args, merged, ENV_PREFIX).validate()
    return app, settings_from_args(args, merged)


def compare_engine_settings(app: AppSettings, engine: EngineSettings) -> EngineSettings | None:
    """Settings of the Compare tab's model: the main engine's, with the other model."""
    if not app.compare_model_path:
        return None
    if engine.backend == "api":
        # --api-tokenizer is the main model's: the compare server fits its own requests
        api = dataclasses.replace(engine.api, model=app.compare_model_path,
                                  base_url=app.compare_api_base_url or engine.api.base_url, tokenizer="")
        if api.base_url == engine.api.base_url and api.model == engine.api.model:
            raise InvalidRequest(f"compare_model_path {api.model!r} is the model the app already serves "
                                 f"at {api.base_url}: name another remote model, or another server with "
                                 "--compare-api-base-url", param="compare_model_path")
        return dataclasses.replace(engine, api=api)
    compare = dataclasses.replace(engine, model_path=app.compare_model_path)
    if engine.backend in ("pytorch", "turbomind"):  # two models share one GPU: half the KV cache each
        half = engine.lmdeploy.cache_max_entry_count / 2
        for s in (engine, compare):
            s.lmdeploy = dataclasses.replace(s.lmdeploy, cache_max_entry_count=half)
    return compare
