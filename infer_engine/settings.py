"""Engine and sampling settings: one place for defaults, loadable from CLI flags and env vars.

Every field of `EngineSettings` (and of its per-backend sections) becomes a flag and an
environment variable: `model_path` -> `--model-path` / `ENGINE_MODEL_PATH`,
`lmdeploy.tp` -> `--lmdeploy-tp` / `ENGINE_LMDEPLOY_TP`. Precedence: flag, env, default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import InvalidRequest
from .sources import DEFAULT_CACHE, SOURCES

ENV_PREFIX = "ENGINE_"
BACKENDS = ("auto", "transformers", "turbomind", "pytorch", "api", "synthetic")


def _help(text: str, **kw: Any) -> dict:
    return {"help": text, **kw}


@dataclass
class LMDeploySettings:
    tp: int = field(default=1, metadata=_help("tensor parallel GPUs"))
    cache_max_entry_count: float = field(
        default=0.8, metadata=_help("fraction of free GPU memory for the KV cache"))
    quant_policy: int = field(default=0, metadata=_help("KV cache quantisation: 0, 4 or 8"))
    model_format: str = field(default="hf", metadata=_help("weights format", choices=("hf", "awq")))
    max_batch_size: int = field(default=0, metadata=_help("0 lets LMDeploy choose"))
    mp_engine: bool = field(default=False, metadata=_help(
        "PyTorch engine: run its loop in a process of its own (LMDeploy's enable_mp_engine, which its "
        "api_server always turns on), so it does not share a GIL with the server or the app"))


@dataclass
class ApiSettings:
    base_url: str = field(default="http://127.0.0.1:23333/v1",
                          metadata=_help("OpenAI-compatible endpoint"))
    api_key: str = field(default="EMPTY", metadata=_help("sent as Bearer token"))
    model: str = field(default="", metadata=_help("remote model name; empty: the first listed"))
    timeout: float = field(default=60.0, metadata=_help("seconds per request"))
    max_retries: int = field(default=3, metadata=_help("retries on connection errors / 5xx"))
    escape_control_tokens: bool = field(
        default=True, metadata=_help("neutralise control tokens in text sent to the server"))
    images: bool = field(default=False, metadata=_help(
        "the remote model takes images: relay image_url parts (off: refused here, and the app shows no clip)"))
    tokenizer: str = field(default="", metadata=_help(
        "a local folder with the remote model's tokenizer and chat template: conversations are then fitted "
        "to --session-len here and a message that cannot fit is refused before it is sent, as with a local "
        "engine (empty: the remote server decides)"))


@dataclass
class TransformersSettings:
    max_batch_size: int = field(default=0, metadata=_help(
        "transformers: sessions decoded together (continuous batching); 0: 8 on a CPU, 64 on a GPU; "
        "1: one at a time"))
    compile: str = field(default="auto", metadata=_help(
        "transformers: a lone stream decodes through a static KV cache and a compiled step (CUDA graphs), "
        "compiled once at start-up; auto: on a GPU", choices=("auto", "on", "off")))
    cb_options: str = field(default="", metadata=_help(
        "transformers: JSON of extra ContinuousBatchingConfig fields for the batch (tuning), e.g. "
        "'{\"use_cuda_graph\": true}'"))


@dataclass
class SyntheticSettings:
    tokens_per_s: float = field(default=100.0, metadata=_help(
        "synthetic backend (tests, benchmarks; no model): tokens per second per stream, 0 = unpaced"))
    reply_tokens: int = field(default=0, metadata=_help(
        "synthetic backend: reply length in tokens (0: echo the question, then end the turn)"))
    cpu_ms_per_token: float = field(default=0.0, metadata=_help(
        "synthetic backend: milliseconds of Python work per token, holding the GIL, as a real engine's own "
        "loop in the app's process costs (benchmarks: reproduces a GPU engine's load on the app on a CPU)"))
    model_name: str = field(default="synthetic", metadata=_help("synthetic backend: model name shown"))
    accepts_images: bool = field(default=False, metadata=_help(
        "synthetic backend: take images in user messages, as a vision-language model does"))


@dataclass
class EngineSettings:
    model_path: str = field(default="", metadata=_help(
        "local folder, openxlab://owner/repo, modelscope://owner/name, hf://owner/name, or a hub id"))
    model_source: str = field(default="huggingface", metadata=_help(
        "where a bare model id (not a folder) is downloaded from", choices=SOURCES[1:]))
    cache_dir: str = field(default=DEFAULT_CACHE, metadata=_help("download cache for models"))
    backend: str = field(default="auto", metadata=_help(
        "inference backend; auto: LMDeploy's PyTorch engine where CUDA and LMDeploy are installed "
        "(transformers for --bits, --adapter-path and image models), transformers otherwise",
        choices=BACKENDS))
    dtype: str = field(default="auto", metadata=_help(
        "weights dtype", choices=("auto", "float32", "float16", "bfloat16")))
    device: str = field(default="auto", metadata=_help("transformers device: auto, cpu, cuda, cuda:1"))
    chat_template: str = field(default="auto", metadata=_help(
        "'auto' uses the tokenizer's template, else a named one (internlm2_chat, qwen_chat, ...)"))
    session_len: int = field(default=4096, metadata=_help("maximum context in tokens"))
    adapter_path: str = field(default="", metadata=_help("LoRA adapter folder served unmerged (transformers)"))
    bits: int = field(default=0, metadata=_help(
        "load the weights in 4 or 8 bits (bitsandbytes, transformers backend, CUDA only), as `xtuner chat "
        "--bits 4` does; 0: the dtype's own", choices=("0", "4", "8")))
    trust_remote_code: bool = field(default=False, metadata=_help(
        "transformers: run a tokenizer's own code from the model folder (InternLM2's hub repos ship their "
        "sentencepiece tokenizer as code); models always load with transformers' own classes"))
    transformers: TransformersSettings = field(default_factory=TransformersSettings)
    lmdeploy: LMDeploySettings = field(default_factory=LMDeploySettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    synthetic: SyntheticSettings = field(default_factory=SyntheticSettings)

    def validate(self) -> "EngineSettings":
        if self.backend not in BACKENDS:
            raise InvalidRequest(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}",
                                 param="backend")
        if self.backend not in ("api", "synthetic") and not self.model_path:
            raise InvalidRequest("model_path is required for the %s backend" % self.backend,
                                 param="model_path")
        if self.transformers.max_batch_size < 0:
            raise InvalidRequest("transformers.max_batch_size must be >= 0", param="transformers.max_batch_size")
        if self.session_len < 16:
            raise InvalidRequest(f"session_len must be >= 16, got {self.session_len}", param="session_len")
        if self.bits not in (0, 4, 8):
            raise InvalidRequest(f"bits must be 0, 4 or 8, got {self.bits}", param="bits")
        if self.bits and self.backend not in ("auto", "transformers"):
            raise InvalidRequest(f"bits {self.bits}: 4/8-bit loading is the transformers backend's (bitsandbytes); "
                                 "LMDeploy serves 4-bit AWQ folders (--lmdeploy-model-format awq)", param="bits")
        if self.transformers.compile not in ("auto", "on", "off"):
            raise InvalidRequest("transformers.compile must be auto, on or off", param="transformers.compile")
        if self.lmdeploy.quant_policy not in (0, 4, 8):
            raise InvalidRequest("lmdeploy.quant_policy must be 0, 4 or 8", param="lmdeploy.quant_policy")
        if not 0 < self.lmdeploy.cache_max_entry_count <= 1:
            raise InvalidRequest("lmdeploy.cache_max_entry_count must be in (0, 1]",
                                 param="lmdeploy.cache_max_entry_count")
        return self

    def resolved(self) -> "EngineSettings":
        """These settings with backend `auto` made concrete (see `auto_backend`)."""
        if self.backend != "auto":
            return self
        return dataclasses.replace(self, backend=auto_backend(self))


def auto_backend(settings: EngineSettings) -> str:
    """LMDeploy's PyTorch engine where it can run (CUDA and LMDeploy installed), unless what is
    asked is the transformers backend's alone (4/8-bit loading, an unmerged adapter, an image
    model: LMDeploy's VLM pipeline was seen failing in its own preprocessing); else transformers.
    The PyTorch engine rather than TurboMind: it is the one run on our GPU host."""
    import importlib.util

    from .architectures import is_vision_model

    if settings.bits or settings.adapter_path or is_vision_model(settings.model_path):
        return "transformers"
    if importlib.util.find_spec("lmdeploy") is None:
        return "transformers"
    try:
        import torch
    except ImportError:
        return "transformers"
    return "pytorch" if torch.cuda.is_available() else "transformers"


# Bounds on what one request may ask for, so that no request makes the engine do unbounded
# work (every stop string is matched against every generated character).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# Temperatures between 0 (greedy) and this are refused: dividing logits by 1e-300 gives
# inf/nan in the sampler (vLLM treats the same range as greedy). Likewise a repetition
# penalty below MIN_PENALTY divides logits by almost zero.
MIN_TEMPERATURE = 1e-5
MIN_PENALTY = 0.01


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 40
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0   # OpenAI's: logit - f x (times the token was generated)
    presence_penalty: float = 0.0    # OpenAI's: logit - p x (token generated at all)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # for benchmarks: always generate max_new_tokens
    # constrained decoding, OpenAI's shape: {"type": "json_object"} or {"type": "json_schema",
    # "json_schema": {"name": ..., "schema": {...}}}; None (or type text): free text
    response_format: dict | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> "SamplingParams":
        def bad(name: str, rule: str) -> InvalidRequest:
            return InvalidRequest(f"{name} must be {rule}, got {getattr(self, name)!r}", param=name)

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not _is_num(self.temperature) or not (self.temperature == 0 or
                                                  MIN_TEMPERATURE <= self.temperature <= 2):
            raise bad("temperature", f"0 (greedy) or a number in [{MIN_TEMPERATURE:g}, 2]")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 disables it)")
        if not _is_num(self.repetition_penalty) or not MIN_PENALTY <= self.repetition_penalty <= 10:
            raise bad("repetition_penalty", f"a number in [{MIN_PENALTY:g}, 10]")
        for name in ("frequency_penalty", "presence_penalty"):
            if not _is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "a number in [-2, 2]")
            setattr(self, name, float(getattr(self, name)))
        self.response_format = check_response_format(self.response_format)
        if self.response_format and self.ignore_eos:  # the JSON ends where the grammar does: nothing may follow
            raise InvalidRequest("ignore_eos cannot be used with response_format (the reply ends with its JSON)",
                                 param="ignore_eos")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or len(self.stop) > MAX_STOP_STRINGS or \
                not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise InvalidRequest(f"stop must be a list of at most {MAX_STOP_STRINGS} non-empty strings "
                                 f"of at most {MAX_STOP_CHARS} characters each", param="stop")
        self.stop = [check_text(s, f"stop[{i}]") for i, s in enumerate(self.stop)]
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise bad("seed", "a non-negative integer")
        # backends check isinstance(..., float): an int temperature of 2 is refused by transformers
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)
        return self


def check_response_format(value: Any) -> dict | None:
    """None for free text, else {"type": "json_object"} or {"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}} (the schema itself is checked when it is compiled)."""
    def bad(why: str) -> InvalidRequest:
        return InvalidRequest(f"response_format: {why}", param="response_format")

    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("type must be text, json_object or json_schema")
    if value["type"] == "text":
        return None
    if value["type"] == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise bad("json_schema must be an object with a schema object")
        schema = spec.get("schema", {})
        size = len(json.dumps(schema))
        if size > MAX_SCHEMA_BYTES:
            raise bad(f"the schema is {size:,} bytes, more than the {MAX_SCHEMA_BYTES:,} taken")
        depth, values = _schema_shape(schema)
        if depth > MAX_SCHEMA_DEPTH:
            raise bad(f"the schema nests {depth} levels deep, more than the {MAX_SCHEMA_DEPTH} taken")
        if values > MAX_SCHEMA_VALUES:
            raise bad(f"the schema lists {values:,} enum/const values, more than the {MAX_SCHEMA_VALUES:,} taken")
        return {"type": "json_schema", "json_schema": {"name": str(spec.get("name") or "response"), "schema": schema}}
    return {"type": "json_object"}


# What a response_format schema may be: compiling one costs the server CPU that grows with its
# size (a 19 KB schema of 450 nested arrays took 4.8 s, an enum of 100,000 values 63 s).
MAX_SCHEMA_BYTES = 16 * 1024
MAX_SCHEMA_DEPTH = 16
MAX_SCHEMA_VALUES = 1000


def _schema_shape(node: Any, depth: int = 0) -> tuple[int, int]:
    """(how deep the schema nests, how many enum/const values it lists), without recursion."""
    deepest, values, todo = 0, 0, [(node, 1)]
    while todo:
        item, d = todo.pop()
        deepest = max(deepest, d)
        if isinstance(item, dict):
            if isinstance(item.get("enum"), list):
                values += len(item["enum"])
            if "const" in item:
                values += 1
            todo += [(v, d + 1) for v in item.values() if isinstance(v, (dict, list))]
        elif isinstance(item, list):
            todo += [(v, d) for v in item if isinstance(v, (dict, list))]
    return deepest, values


_SOURCE_PATH = re.compile(r"(?:/[\w.+-]+)+\.(?:py|cc|cpp|h|hpp|so)(?::\d+)?")


def clean_error(exc: Exception) -> str:
    """A library's error message for a client: no file paths of the server's own."""
    return _SOURCE_PATH.sub("", str(exc)).replace("  ", " ").strip()


def response_schema(response_format: dict) -> dict:
    """The JSON schema a checked response_format asks for (json_object: any object)."""
    if response_format["type"] == "json_object":
        return {"type": "object"}
    return response_format["json_schema"]["schema"]


def check_schema(response_format: dict) -> None:
    """Refuse, naming the field, a schema the grammar library (xgrammar, which LMDeploy's and
    our constrained decoding use) cannot compile: found before the request reaches an engine."""
    import xgrammar as xgr

    try:
        xgr.Grammar.from_json_schema(json.dumps(response_schema(response_format)), any_whitespace=False)
    except Exception as exc:  # xgrammar's own message says what is wrong (its source paths taken out)
        raise InvalidRequest(f"response_format: the schema cannot be used: {clean_error(exc)}",
                             param="response_format") from None


def check_text(value: Any, where: str) -> str:
    """A str that encodes as UTF-8: JSON lets clients send lone surrogates such as "\\ud800",
    which no tokenizer, JSON encoder or HTTP client takes."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string", param=where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{where} is not valid Unicode text: a lone surrogate "
                             f"\\u{ord(value[exc.start]):04x} at character {exc.start}",
                             param=where) from None
    return value


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- CLI / environment -----------------------------------------------------------------
# Generic over dataclasses so that other settings (the app's) get flags and env vars the same way.

def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    """Flatten nested dataclass fields into (dotted name, field, type)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, tp))
    return out


def _flag(name: str) -> str:
    return "--" + name.replace(".", "-").replace("_", "-")


def _env(name: str, env_prefix: str) -> str:
    return env_prefix + name.replace(".", "_").upper()


def _convert(raw: str, tp: type, name: str) -> Any:
    try:
        if tp is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return tp(raw)
    except ValueError:
        raise InvalidRequest(f"{name}: cannot read {raw!r} as {tp.__name__}", param=name) from None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, env_prefix: str,
                            title: str) -> None:
    """One flag per (nested) field; defaults are shown here but applied in `dataclass_from_args`."""
    group = parser.add_argument_group(title)
    for name, f, tp in _leaf_fields(cls):
        meta = dict(f.metadata)
        help_text = f"{meta.pop('help', '')} (env {_env(name, env_prefix)}; default: {_default(f)!r})"
        group.add_argument(_flag(name), dest=name, default=None, type=str, help=help_text,
                           metavar="BOOL" if tp is bool else None, **meta)


def dataclass_from_args(cls: type, args: argparse.Namespace | None, env: Mapping[str, str] | None,
                        env_prefix: str) -> Any:
    """Build `cls` from parsed flags, then env vars, then the dataclass defaults."""
    env = os.environ if env is None else env
    obj = cls()
    for name, _f, tp in _leaf_fields(cls):
        raw = getattr(args, name, None) if args is not None else None
        if raw is None:
            raw = env.get(_env(name, env_prefix))
        if raw is None:
            continue
        target = obj
        *parents, leaf = name.split(".")
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, _convert(raw, tp, name))
    return obj


def dataclass_env(obj: Any, env_prefix: str) -> dict[str, str]:
    """The environment variables from which `dataclass_from_args` builds `obj` again (how a
    process hands its settings to a process it starts)."""
    out = {}
    for name, _f, tp in _leaf_fields(type(obj)):
        value = obj
        for part in name.split("."):
            value = getattr(value, part)
        out[_env(name, env_prefix)] = ("true" if value else "false") if tp is bool else str(value)
    return out


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, EngineSettings, ENV_PREFIX, "engine")


def settings_from_args(args: argparse.Namespace | None = None,
                       env: Mapping[str, str] | None = None) -> EngineSettings:
    """EngineSettings from parsed flags, then ENGINE_* env vars, then defaults; validated, with
    backend `auto` resolved (so that what follows sees the engine that will run)."""
    return dataclass_from_args(EngineSettings, args, env, ENV_PREFIX).validate().resolved()


def parse_engine_settings(argv: Sequence[str] | None = None) -> EngineSettings:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return settings_from_args(parser.parse_args(argv))
