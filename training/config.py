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
    """Python source edited by byte spans of its syntax tree (ast offsets are UTF-8 bytes)."""

    def __init__(self, text: str):
        self.data = text.encode("utf-8")

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
            self._replace(*self._span(node.value), code)
            return
        anchor = self._assign(after) if after else None
        if anchor is None:
            raise DataError(f"base config has no variable {after or var!r} to edit")
        end = self._span(anchor)[1]
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
        self._replace(*self._span(kw.value), code)

    def del_kw(self, var: str, path: list[str]) -> None:
        kw = self._keyword(var, path)
        if kw is None:
            return
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


def render(s: TrainSettings) -> str:
    src = _Source(builtin_config(s.base_config).read_text(encoding="utf-8"))
    literal = {
        "pretrained_model_name_or_path": repr(s.model_path), "max_length": repr(s.max_length),
        "pack_to_max_length": repr(s.pack_to_max_length), "batch_size": repr(s.batch_size),
        "accumulative_counts": repr(s.accumulative_counts), "max_epochs": repr(s.epochs),
        "lr": repr(s.lr), "warmup_ratio": repr(s.warmup_ratio), "save_steps": repr(s.save_steps),
        "save_total_limit": repr(s.save_total_limit), "evaluation_freq": repr(s.evaluation_freq),
        "SYSTEM": repr(s.system), "evaluation_inputs": repr(list(s.evaluation_inputs)),
        "prompt_template": f"PROMPT_TEMPLATE.{template_of(s)}",
        "randomness": f"dict(seed={s.seed!r}, deterministic=False)",
    }
    for var, code in literal.items():
        if src.has(var):
            src.set_var(var, code)
    # our data: OpenAI-messages JSONL files instead of the built-in Hugging Face dataset
    src.set_var("data_files", repr([str(Path(f).resolve()) for f in s.data_files]),
                after="pretrained_model_name_or_path")
    dataset = src.var_with_keyword("dataset_map_fn")
    src.set_kw(dataset, ["dataset"], "dict(type=load_dataset, path='json', data_files=dict(train=data_files))")
    src.set_kw(dataset, ["dataset_map_fn"], "openai_map_fn")
    src.add_import("from xtuner.dataset.map_fns import openai_map_fn")
    # method
    if s.method in ("lora", "full"):
        src.del_kw("model", ["llm", "quantization_config"])
    if s.method == "full":
        src.del_kw("model", ["lora"])
        # XTuner's own full configs load fp32 weights under fp16 AMP; fp16 weights fail at the
        # first step ("Attempting to unscale FP16 gradients")
        src.del_kw("model", ["llm", "torch_dtype"])
    elif src._keyword("model", ["lora"]) is not None:
        src.set_kw("model", ["lora", "r"], repr(s.lora_r))
        src.set_kw("model", ["lora", "lora_alpha"], repr(s.lora_alpha))
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
    if s.max_steps:
        # Iteration-based: with epoch-based schedules a short run rounds the warm-up to zero
        # iterations and the learning rate stays near start_factor * lr.
        warm = max(2, round(s.warmup_ratio * s.max_steps))  # LinearLR over one step never ramps
        src.set_var("train_cfg", f"dict(type=TrainLoop, max_iters={s.max_steps})")
        src.set_var("param_scheduler", (
            f"[\n    dict(type=LinearLR, start_factor=1e-5, by_epoch=False, begin=0, end={warm}),\n"
            f"    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=False, begin={warm}, "
            f"end={s.max_steps}),\n]"))
    return f"# Rendered from XTuner's {s.base_config} by training/config.py\n" + src.text


def write_config(s: TrainSettings, out: str | Path) -> Path:
    """Render, write atomically, and load it back with mmengine as XTuner will."""
    text = render(s)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
        load_config(tmp)
    return out


def load_config(path: str | Path):
    from mmengine.config import Config

    try:
        return Config.fromfile(str(path), lazy_import=True)
    except Exception as exc:
        raise DataError(f"{path}: the rendered config does not load: {exc}") from None
