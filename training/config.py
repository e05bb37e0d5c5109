"""Render a runnable XTuner config: one of XTuner's built-in configs (what `xtuner copy-cfg`
gives) with our settings written in as literal values — the dozen hand edits the tutorials make.

Edits are made on the source through its syntax tree (top-level variables and keywords of the
dict(...) calls), so the result stays a normal XTuner config that a person can read and rerun.
Values are literals: XTuner parses configs in mmengine's lazy-import mode, where expressions
such as os.environ.get(...) fail.
"""
from __future__ import annotations

import ast
import difflib
import json
import re
from pathlib import Path

from .data.io import DataError, atomic_path
from .settings import TrainSettings


def builtin_config(name: str) -> Path:
    """An XTuner built-in config by name (`xtuner list-cfg`), or the path of a config file of
    the user's own (the tutorials' `xtuner copy-cfg` + edit habit)."""
    import xtuner

    if name.endswith(".py"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"base_config: {name}: no such config file")
        return path
    root = Path(xtuner.__file__).parent / "configs"
    found = sorted(root.rglob(f"{name}.py"))
    if not found:
        names = [p.stem for p in root.rglob("*.py") if not p.name.startswith("_")]
        near = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else " (see `xtuner list-cfg`)"
        raise DataError(f"base_config: XTuner has no built-in config {name!r}{hint}")
    return found[0]


class _Source:
    """Python source edited by byte spans of its syntax tree (ast offsets are UTF-8 bytes).
    Every value it changes is recorded (`changes`: name, old code, new code), so a run can say
    what it made different from the config it started from."""

    def __init__(self, text: str):
        self.data = text.encode("utf-8")
        self.changes: list[tuple[str, str, str]] = []

    def _record(self, name: str, old: str | None, new: str | None) -> None:
        if old != new:
            self.changes.append((name, old if old is not None else "(none)", new if new is not None else "(removed)"))

    def code(self, node: ast.AST) -> str:
        start, end = self._span(node)
        return self.data[start:end].decode("utf-8")

    def literal(self, var: str):
        """The value of `var = <literal>`, or None (not there, or not a literal)."""
        node = self._assign(var)
        try:
            return ast.literal_eval(node.value) if node is not None else None
        except ValueError:
            return None

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")

    def _pos(self, lineno: int, col: int) -> int:
        lines = self.data.splitlines(keepends=True)
        return sum(len(ln) for ln in lines[:lineno - 1]) + col

    def _span(self, node: ast.AST) -> tuple[int, int]:
        return (self._pos(node.lineno, node.col_offset), self._pos(node.end_lineno, node.end_col_offset))

    def _replace(self, start: int, end: int, code: str) -> None:
        self.data = self.data[:start] + code.encode("utf-8") + self.data[end:]

    def _assign(self, var: str) -> ast.Assign | None:
        for node in ast.parse(self.data).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == var
                                                    for t in node.targets):
                return node
        return None

    def has(self, var: str) -> bool:
        return self._assign(var) is not None

    def set_var(self, var: str, code: str, after: str | None = None) -> None:
        node = self._assign(var)
        if node is not None:
            self._record(var, self.code(node.value), code)
            self._replace(*self._span(node.value), code)
            return
        anchor = self._assign(after) if after else None
        if anchor is None:
            raise DataError(f"base config has no variable {after or var!r} to edit")
        end = self._span(anchor)[1]
        self._record(var, None, code)
        self._replace(end, end, f"\n{var} = {code}")

    def _keyword(self, var: str, path: list[str]) -> ast.keyword | None:
        node = self._assign(var)
        call = node.value if node else None
        kw = None
        for name in path:
            if not isinstance(call, ast.Call):
                return None
            kw = next((k for k in call.keywords if k.arg == name), None)
            if kw is None:
                return None
            call = kw.value
        return kw

    def set_kw(self, var: str, path: list[str], code: str) -> None:
        kw = self._keyword(var, path)
        if kw is None:
            raise DataError(f"base config has no {var}.{'.'.join(path)} to edit")
        self._record(".".join([var, *path]), self.code(kw.value), code)
        self._replace(*self._span(kw.value), code)

    def put_kw(self, var: str, path: list[str], code: str) -> None:
        """Set the keyword at `path` in `var = Call(...)`, adding it to its call when it has none."""
        kw = self._keyword(var, path)
        if kw is not None:
            self._record(".".join([var, *path]), self.code(kw.value), code)
            self._replace(*self._span(kw.value), code)
            return
        self._record(".".join([var, *path]), None, code)
        parent = self._keyword(var, path[:-1]) if len(path) > 1 else self._assign(var)
        if parent is None or not isinstance(parent.value, ast.Call):
            raise DataError(f"base config has no {'.'.join([var, *path[:-1]])} = dict(...) to edit")
        close = self._span(parent.value)[1] - 1  # the call's ")"
        before = self.data[:close].rstrip()
        sep = "" if before.endswith((b",", b"(")) else ","
        at = len(before)
        self._replace(at, at, f"{sep}\n    {path[-1]}={code}")

    def del_kw(self, var: str, path: list[str]) -> None:
        kw = self._keyword(var, path)
        if kw is None:
            return
        self._record(".".join([var, *path]), self.code(kw.value), None)
        start, end = self._span(kw)
        rest = self.data[end:]
        stripped = rest.lstrip()
        if stripped.startswith(b","):
            end += len(rest) - len(stripped) + 1
        self._replace(start, end, "")

    def var_with_keyword(self, keyword: str) -> str:
        for node in ast.parse(self.data).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                    any(k.arg == keyword for k in node.value.keywords) and isinstance(node.targets[0], ast.Name):
                return node.targets[0].id
        raise DataError(f"base config has no dataset with {keyword}")

    def add_import(self, line: str) -> None:
        if line in self.text:
            return
        last = [n for n in ast.parse(self.data).body if isinstance(n, (ast.Import, ast.ImportFrom))][-1]
        end = self._span(last)[1]
        self._replace(end, end, "\n" + line)


_TEMPLATE = re.compile(r"^prompt_template\s*=\s*PROMPT_TEMPLATE\.(\w+)", re.M)


def template_of(s: TrainSettings) -> str:
    """The prompt template training uses: the one asked for, else the base config's own (an
    InternLM-1 config keeps internlm_chat; forcing internlm2_chat would train the wrong one)."""
    if s.prompt_template:
        return s.prompt_template
    m = _TEMPLATE.search(builtin_config(s.base_config).read_text(encoding="utf-8"))
    if not m:
        raise DataError(f"base_config {s.base_config}: no `prompt_template = PROMPT_TEMPLATE.<name>` "
                        "in it: set prompt_template")
    return m.group(1)


# Activation memory without checkpointing, bytes per layer x hidden x token, measured on an H200:
# InternLM2-1.8B LoRA at 8,192 packed tokens peaked at 46 GB (30.8 % MFU; 19.2 % with
# checkpointing at 4,096 tokens).
ACTIVATION_BYTES = 110


def model_shape(model_path: str | Path) -> dict | None:
    """hidden_size, num_hidden_layers, ... from the model's config.json (None if unreadable)."""
    try:
        c = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
        c = c.get("text_config", c)
        return {k: int(c[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")} | {
            "num_attention_heads": int(c.get("num_attention_heads", 1)),
            "num_key_value_heads": int(c.get("num_key_value_heads") or c.get("num_attention_heads", 1))}
    except (OSError, KeyError, TypeError, ValueError):
        return None


def use_checkpointing(s: TrainSettings, gpu_gb: float | None = None) -> bool:
    """activation_checkpointing auto: off where the activations of a whole step fit in 60 % of
    the GPU (the rest for weights, logits and optimizer state), on otherwise, on the CPU profile
    and where the model's shape is unknown."""
    value = str(s.activation_checkpointing).lower()
    if value != "auto":
        return value == "true"
    shape = model_shape(s.model_path)
    if s.profile == "cpu" or shape is None:
        return True
    if gpu_gb is None:
        gpu_gb = _gpu_memory_gb()
    need = ACTIVATION_BYTES * shape["num_hidden_layers"] * shape["hidden_size"] * s.max_length * s.batch_size
    return not (gpu_gb and need <= 0.6 * gpu_gb * 2**30)


def _gpu_memory_gb() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return min(torch.cuda.get_device_properties(i).total_memory
                       for i in range(torch.cuda.device_count())) / 2**30
    except Exception:
        pass
    return 0.0


# our settings -> the config's variables they are written into (as literals)
CONFIG_VARS = {"max_length": "max_length", "pack_to_max_length": "pack_to_max_length", "batch_size": "batch_size",
               "accumulative_counts": "accumulative_counts", "epochs": "max_epochs", "lr": "lr",
               "warmup_ratio": "warmup_ratio", "save_total_limit": "save_total_limit", "system": "SYSTEM",
               "evaluation_inputs": "evaluation_inputs", "prompt_template": "prompt_template", "seed": "randomness"}
STEP_VARS = {"save_steps": "save_steps", "evaluation_freq": "evaluation_freq"}  # updates here, batches there


def render(s: TrainSettings) -> str:
    return render_config(s)[0]


def render_config(s: TrainSettings) -> tuple[str, list[tuple[str, str, str]]]:
    """The config's text, and every value changed from the base config (name, old, new). A
    built-in config gets every setting; a config of the user's own keeps its values but for the
    settings the user gave (and what this machine or the data need: the model, the data, a CPU's
    fp32)."""
    own = s.base_config.endswith(".py")

    def take(key: str) -> bool:
        return not own or s.gave(key)

    src = _Source(builtin_config(s.base_config).read_text(encoding="utf-8"))
    codes = {
        "max_length": repr(s.max_length), "pack_to_max_length": repr(s.pack_to_max_length),
        "batch_size": repr(s.batch_size), "accumulative_counts": repr(s.accumulative_counts),
        "epochs": repr(s.epochs), "lr": repr(s.lr), "warmup_ratio": repr(s.warmup_ratio),
        "save_total_limit": repr(s.save_total_limit), "system": repr(s.system),
        "evaluation_inputs": repr(list(s.evaluation_inputs)), "prompt_template": f"PROMPT_TEMPLATE.{template_of(s)}",
        "seed": f"dict(seed={s.seed!r}, deterministic=False)",
    }
    if src.has("pretrained_model_name_or_path"):
        src.set_var("pretrained_model_name_or_path", repr(s.model_path))
    for key, var in CONFIG_VARS.items():
        if take(key) and src.has(var):
            src.set_var(var, codes[key])
    accumulation = accumulation_of(s, src)
    for key, var in STEP_VARS.items():
        if take(key) and src.has(var):
            src.set_var(var, repr(getattr(s, key) * accumulation))
    # our data: OpenAI-messages JSONL files instead of the built-in Hugging Face dataset
    src.set_var("data_files", repr([str(Path(f).resolve()) for f in s.data_files]),
                after="pretrained_model_name_or_path")
    dataset = src.var_with_keyword("dataset_map_fn")
    src.set_kw(dataset, ["dataset"], "dict(type=load_dataset, path='json', data_files=dict(train=data_files))")
    src.set_kw(dataset, ["dataset_map_fn"], "openai_map_fn")
    src.add_import("from xtuner.dataset.map_fns import openai_map_fn")
    # method (a config of one's own keeps its own unless method is given; a CPU cannot quantise)
    method = s.method if take("method") else None
    if method in ("lora", "full") or s.profile == "cpu":
        src.del_kw("model", ["llm", "quantization_config"])
    if method == "full":
        src.del_kw("model", ["lora"])
        # XTuner's own full configs load fp32 weights under fp16 AMP; fp16 weights fail at the
        # first step ("Attempting to unscale FP16 gradients")
        src.del_kw("model", ["llm", "torch_dtype"])
    elif src._keyword("model", ["lora"]) is not None:
        if take("lora_r"):
            src.set_kw("model", ["lora", "r"], repr(s.lora_r))
        if take("lora_alpha"):
            src.set_kw("model", ["lora", "lora_alpha"], repr(s.lora_alpha))
        if src._keyword("model", ["lora", "target_modules"]) is None:
            # PEFT's "all-linear": every linear layer but the output head. XTuner's own default
            # drops the head only when it is named lm_head or output_layer: InternLM2's `output`
            # got a LoRA of its own (the tiny InternLM2's later answers fell apart with it).
            src.put_kw("model", ["lora", "target_modules"], repr("all-linear"))
    if take("log_interval") and src._keyword("default_hooks", ["logger", "interval"]) is not None:
        src.set_kw("default_hooks", ["logger", "interval"], repr(s.log_interval))
    # recompute activations in the backward pass: less memory, about a third more compute
    if take("activation_checkpointing"):
        src.put_kw("model", ["use_activation_checkpointing"], repr(use_checkpointing(s)))
    if s.profile == "cpu":  # fp32, no AMP: CPU runs for tests and the demo
        if src._keyword("model", ["llm", "torch_dtype"]) is not None:
            src.set_kw("model", ["llm", "torch_dtype"], "torch.float32")
        src.set_kw("optim_wrapper", ["type"], "OptimWrapper")
        src.del_kw("optim_wrapper", ["loss_scale"])
        src.del_kw("optim_wrapper", ["dtype"])
        src.add_import("from mmengine.optim import OptimWrapper")
    # tokens/s and TFLOPs per iteration in the log, for the pipeline's summary
    src.add_import("from xtuner.engine.hooks import ThroughputHook")
    if src.has("custom_hooks"):
        end = src._span(src._assign("custom_hooks"))[1]
        src._replace(end, end, "\ncustom_hooks.append(dict(type=ThroughputHook))")
    if s.max_steps and take("max_steps"):
        # Iteration-based: with epoch-based schedules a short run rounds the warm-up to zero
        # iterations and the learning rate stays near start_factor * lr.
        iters = s.max_steps * accumulation
        warm = max(2, round(s.warmup_ratio * iters))  # LinearLR over one step never ramps
        src.set_var("train_cfg", f"dict(type=TrainLoop, max_iters={iters})")
        src.set_var("param_scheduler", (
            f"[\n    dict(type=LinearLR, start_factor=1e-5, by_epoch=False, begin=0, end={warm}),\n"
            f"    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=False, begin={warm}, "
            f"end={iters}),\n]"))
    return f"# Rendered from XTuner's {s.base_config} by training/config.py\n" + src.text, src.changes


def accumulation_of(s: TrainSettings, src: "_Source | None" = None) -> int:
    """Batches per optimizer update: the setting, or what a config of one's own says."""
    if s.base_config.endswith(".py") and not s.gave("accumulative_counts"):
        src = src or _Source(builtin_config(s.base_config).read_text(encoding="utf-8"))
        value = src.literal("accumulative_counts")
        return value if isinstance(value, int) and value > 0 else 1
    return s.accumulative_counts


def describe_changes(changes: list[tuple[str, str, str]], base: str) -> str:
    """The values a run changed from its base config, one per line."""
    def short(code: str) -> str:
        code = " ".join(code.split())
        return code if len(code) <= 70 else code[:67] + "..."
    lines = [f"[config] changed from {Path(base).name if base.endswith('.py') else base}:"]
    lines += [f"  {name}: {short(old)} -> {short(new)}" for name, old, new in changes]
    return "\n".join(lines)


def write_config(s: TrainSettings, out: str | Path, changes: list | None = None) -> Path:
    """Render, write atomically, and load it back with mmengine as XTuner will; what changed
    from the base config is appended to `changes` when given."""
    text, made = render_config(s)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
        load_config(tmp)
    if changes is not None:
        changes += made
    return out


def load_config(path: str | Path):
    from mmengine.config import Config

    try:
        return Config.fromfile(str(path), lazy_import=True)
    except Exception as exc:
        raise DataError(f"{path}: the rendered config does not load: {exc}") from None
