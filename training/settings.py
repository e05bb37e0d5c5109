"""Training settings: a small YAML file of overrides on top of an XTuner built-in config.

    base_config: internlm2_chat_1_8b_qlora_alpaca_e3   # any `xtuner list-cfg` name
    model_path: /root/models/internlm2-chat-1_8b
    data_files: [data/self_cognition.jsonl]
    method: lora            # qlora | lora | full
    max_steps: 300          # optimizer updates (each is accumulative_counts batches); 0: train by epochs
    evaluation_inputs: [你是谁, 请介绍一下你自己]

Keys not given keep the defaults below; `--set key=value` on the command line wins over the file.
With `base_config` the path of a config of one's own (the tutorials' `xtuner copy-cfg` + edit),
that config's values stay unless a key is given here. Steps (`max_steps`, `save_steps`,
`evaluation_freq`) count optimizer updates, as Hugging Face's Trainer counts them; XTuner counts
batches ("iterations"), and the pipeline says what each comes to.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.io import DataError

METHODS = ("qlora", "lora", "full")
PATH_LISTS = {"data_files"}
DEEPSPEED = ("", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")


@dataclass
class TrainSettings:
    base_config: str = "internlm2_chat_1_8b_qlora_alpaca_e3"
    model_path: str = ""
    data_files: list[str] = field(default_factory=list)
    prompt_template: str = ""           # empty: the base config's own
    max_length: int = 8192              # packed tokens per sample (and the truncation length)
    pack_to_max_length: bool = True
    activation_checkpointing: str = "auto"  # true | false | auto: off on GPUs of >= 80 GB
    batch_size: int = 1
    accumulative_counts: int = 16       # batches per optimizer update
    epochs: int = 3
    max_steps: int = 0                  # optimizer updates; > 0: an iteration-based loop and schedule
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    save_steps: int = 25                # optimizer updates between checkpoints
    log_interval: int = 10              # iterations per line of train.log (and per progress step)
    save_total_limit: int = -1          # keep every checkpoint: selection scores them all
    evaluation_freq: int = 25           # optimizer updates between XTuner's sample answers in the log
    evaluation_inputs: list[str] = field(default_factory=lambda: ["你是谁", "请介绍一下你自己"])
    general_questions: list[str] = field(default_factory=lambda: [
        "请用一句话介绍上海", "What is machine learning?"])
    expected_answer: str = ""           # checkpoint selection: text an identity answer must hold
    system: str = ""
    method: str = "qlora"
    lora_r: int = 64
    lora_alpha: int = 16
    deepspeed: str = ""
    gpus: int = 1
    profile: str = "gpu"                # gpu | cpu (fp32, plain optimizer, no quantisation)
    seed: int = 0
    work_dir: str = "work_dirs/run"
    # the keys the user gave (settings file or --set); None: all (settings made in code)
    given: frozenset | None = field(default=None, repr=False, compare=False, metadata={"internal": True})

    def gave(self, name: str) -> bool:
        return self.given is None or name in self.given

    def validate(self) -> "TrainSettings":
        def bad(name: str, why: str) -> DataError:
            return DataError(f"{name}: {why}, got {getattr(self, name)!r}")

        if not self.model_path:
            raise bad("model_path", "required")
        if not self.data_files:
            raise bad("data_files", "name at least one JSONL file")
        if self.method not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}")
        if self.deepspeed not in DEEPSPEED:
            raise bad("deepspeed", f"must be one of {', '.join(d or 'empty' for d in DEEPSPEED)}")
        if str(self.activation_checkpointing).lower() not in ("auto", "true", "false"):
            raise bad("activation_checkpointing", "must be auto, true or false")
        if self.profile not in ("gpu", "cpu"):
            raise bad("profile", "must be gpu or cpu")
        if self.profile == "cpu" and (self.method == "qlora" or self.deepspeed or self.gpus > 1):
            raise DataError("profile cpu: QLoRA, DeepSpeed and several GPUs need CUDA "
                            "(use method: lora, no deepspeed, gpus: 1)")
        for name in ("max_length", "batch_size", "accumulative_counts", "epochs", "save_steps",
                     "evaluation_freq", "gpus", "lora_r", "lora_alpha", "log_interval"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.max_steps < 0 or not 0 <= self.warmup_ratio < 1 or self.lr <= 0:
            raise DataError("max_steps must be >= 0, warmup_ratio in [0, 1), lr > 0")
        return self


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            # file lists split on commas (data_files=a.jsonl,b.jsonl); a text is one item: "Hi,
            # who are you?" is one question (YAML [a, b] gives several of either)
            value = [v.strip() for v in value.split(",")] if name in PATH_LISTS else [value]
            value = [v for v in value if v.strip()]
        if not isinstance(value, list):
            raise DataError(f"{name}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if tp is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise DataError(f"{name}: expected true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise DataError(f"{name}: expected {tp.__name__}, got {value!r}") from None


def load_settings(path: str | Path | None = None, overrides: list[str] | None = None,
                  cls: type = TrainSettings) -> Any:
    """YAML file (optional), then `key=value` overrides, into `cls` (TrainSettings, or the
    LLaVA pipeline's settings); unknown keys are errors."""
    import yaml

    values: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise DataError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(loaded, dict):
            raise DataError(f"{path}: expected a mapping of settings")
        values.update(loaded)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"--set {item!r}: expected key=value")
        values[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    settings = cls()
    for key, value in values.items():
        if key not in known:
            raise DataError(f"{path or '--set'}: unknown setting {key!r}")
        setattr(settings, key, _coerce(key, value, hints[key]))
    if "given" in {f.name for f in dataclasses.fields(cls)}:
        settings.given = frozenset(values)
    return settings.validate()
