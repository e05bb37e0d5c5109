"""The whole fine-tuning flow in one command: check what is needed -> validate data -> render
config -> xtuner train -> score checkpoints and pick one -> judge whether the run learned ->
convert -> merge into a model folder the serving side loads -> a summary from XTuner's log.

    python -m training.pipeline --config train.yaml [--set key=value ...] [--resume] [--out DIR]
                                [--allow-unlearned]

A run without --resume starts afresh: once its data checked out, the work dir's checkpoints,
adapters, logs and merged model of an earlier run (and the --out folder) are moved to
WORK_DIR/previous (a rerun with edited data never ships old weights, and a rerun that fails
leaves no model that looks like its result). A run whose verdict is not "learned" ships nothing
and exits 3 (--allow-unlearned: merged anyway). Ctrl-C or SIGTERM stop the training with it,
say where, and leave what --resume continues from (exit 130 / 143).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from .config import builtin_config, describe_changes, load_config, model_shape, template_of, \
    write_config
from .data.io import DataError, run_cli, write_jsonl
from .data.validate import samples, validate
from .run import AS_RUN, StepFailed, Stopped, checkpoints, export_full, latest_checkpoint, merge, stoppable, train
from .select import Verdict, judge, pick, score_checkpoints, table
from .settings import TrainSettings, load_settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NOT_LEARNED = 3  # the exit status of a run whose verdict is not "learned"


class NotLearned(Exception):
    def __init__(self, verdict: Verdict):
        super().__init__(verdict.line())
        self.verdict = verdict


def hub_reachable(timeout: float = 3.0) -> str:
    """"" when the Hugging Face hub answers a connection now, else why not (HF_HUB_OFFLINE, or the
    connection's error): a path that is no folder is sent to a hub only then."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return ""
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc.strerror or exc}"


def model_location(path: str) -> str:
    """model_path as XTuner and transformers take it: a folder, or a hub id. hf://owner/name and
    modelscope://owner/name name a hub; a bare owner/name that is no folder here goes to the
    Hugging Face hub only when it answers, else the error names both readings."""
    if path.startswith("hf://"):
        return path[len("hf://"):]
    if path.startswith("modelscope://"):
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise DataError(f"model_path: {path}: downloading from ModelScope needs `pip install modelscope` "
                            "(or download the model and give its folder)") from None
        return snapshot_download(path[len("modelscope://"):])
    if Path(path).expanduser().exists():
        return path
    if HUB_ID.match(path):
        why = hub_reachable()
        if not why:
            return path
        raise DataError(f"model_path: {path}: no such folder here; read as a Hugging Face hub id the hub is not "
                        f"reachable ({why}). A folder: check its path. A hub model: hf://{path} or "
                        f"modelscope://{path}")
    raise DataError(f"model_path: {path}: no such folder")


def preflight(s: TrainSettings) -> TrainSettings:
    """What the run needs, checked before anything runs: one line saying what is missing. Returns
    the settings with model_path as the tools take it."""
    config = builtin_config(s.base_config)  # an unknown name is reported now, not after the data check
    if "LLaVAModel" in config.read_text(encoding="utf-8"):
        raise DataError(f"base_config: {s.base_config} is a LLaVA (image) config: run python -m training.llava "
                        "with it as finetune_config (see training/examples/llava_internlm2_1_8b_qlora.yaml)")
    s = _with(s, model_path=model_location(s.model_path))
    for f in s.data_files:
        if not Path(f).is_file():
            raise DataError(f"data_files: {f}: no such file")
    warn_template_mismatch(s)
    if s.profile == "cpu":
        return s
    import torch

    if not torch.cuda.is_available():
        raise DataError("profile gpu: no CUDA device here (profile: cpu trains with fp32 LoRA on the CPU)")
    if s.gpus > torch.cuda.device_count():
        raise DataError(f"gpus: {s.gpus} asked for, {torch.cuda.device_count()} here")
    if s.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # missing, or built for another CUDA
            raise DataError(f"method qlora needs bitsandbytes with CUDA ({type(exc).__name__}: {exc}): "
                            "pip install bitsandbytes (or use method: lora)") from None
    if s.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise DataError(f"deepspeed {s.deepspeed}: DeepSpeed is not installed: pip install deepspeed "
                        "(its ops build on first use; or leave deepspeed empty)")
    return s


MARKER = re.compile(r"<\|?[A-Za-z_]+\|?>")


def warn_template_mismatch(s: TrainSettings) -> None:
    """The merged model is served with its tokenizer's chat template: a model trained in another
    format answers its new lines only when prompted the training way. Say so before training."""
    config = Path(s.model_path).expanduser() / "tokenizer_config.json"
    if not config.is_file():
        return
    import json

    served = json.loads(config.read_text(encoding="utf-8")).get("chat_template") or ""
    from xtuner.utils import PROMPT_TEMPLATE

    name = template_of(s)
    marker = MARKER.search(PROMPT_TEMPLATE[name]["INSTRUCTION"]) if name in PROMPT_TEMPLATE else None
    if served and marker and marker.group(0) not in served:
        print(f"[warning] prompt template {name} writes {marker.group(0)} but {config}'s chat_template "
              "does not: the served model will be prompted another way than it was trained "
              "(set prompt_template to the model's own format)", flush=True)


EARLIER_RUN = ("adapters", "last_checkpoint", "train.log", "convert.log", "merge.log", "config.py", AS_RUN,
               ".xtuner", "data", "merged", "models")


def prepare_work_dir(work: Path, resume: bool, out: Path | None = None) -> None:
    """A fresh run moves an earlier run's checkpoints, adapters, logs and merged model aside
    (and the --out folder, wherever it is): until this run has shipped, nothing looks like its
    result."""
    work.mkdir(parents=True, exist_ok=True)
    if resume:
        return
    old = [p for p in work.iterdir() if p.name in EARLIER_RUN
           or re.fullmatch(r"iter_\d+\.pth", p.name) or re.fullmatch(r"\d{8}_\d{6}", p.name)]
    if out is not None and out.exists() and out.resolve().parent != work.resolve():
        old.append(out)
    if not old:
        return
    dest = work / "previous" / time.strftime("%Y%m%d_%H%M%S")
    dest.mkdir(parents=True)
    for p in old:
        shutil.move(str(p), dest / p.name)
    print(f"[work] a fresh run: the earlier run's {len(old)} files moved to {dest} (--resume continues it)")


def check_data(s: TrainSettings) -> None:
    """Validate every data file (JSONL or a JSON array; messages or XTuner conversations) before
    anything is written or moved."""
    from transformers import AutoTokenizer
    from xtuner.utils import PROMPT_TEMPLATE

    for f in s.data_files:  # the files' own faults first, before a model is loaded
        validate(f)
    tok = AutoTokenizer.from_pretrained(s.model_path, trust_remote_code=True)
    template = dict(PROMPT_TEMPLATE[template_of(s)])
    for f in s.data_files:
        r = validate(f, tok, s.max_length, template)
        print(f"[data] {f}: {r.samples} samples, longest {r.max_tokens} tokens (max_length {s.max_length})"
              + (f"; {r.duplicates_note()}" if r.duplicates_note() else ""))


def prepare_data(s: TrainSettings, work: Path) -> list[str]:
    """The data files (checked) as messages JSONL for XTuner's openai_map_fn; the files training reads."""
    out = []
    for i, f in enumerate(s.data_files):
        target = work / "data" / f"{i}_{Path(f).stem}.jsonl"
        write_jsonl(target, ({"messages": msgs} for _, msgs in samples(f)))
        out.append(str(target))
    return out


def schedule_line(config: Path) -> tuple[str, int, int, int]:
    """What the rendered config will do, in optimizer updates and in XTuner's iterations:
    (the line, accumulation, checkpoint interval, evaluation interval) in iterations."""
    cfg = load_config(config)
    acc = int(cfg.get("accumulative_counts", 1) or 1)
    batch = cfg.train_dataloader.get("batch_size", "?")
    save = int(cfg.default_hooks.checkpoint.get("interval", 0) or 0)
    evaluate = int(cfg.get("evaluation_freq", 0) or 0)
    loop = cfg.train_cfg
    length = f"{loop.max_iters:,} iterations = {loop.max_iters / acc:,.0f} optimizer updates" if "max_iters" in loop \
        else f"{loop.get('max_epochs')} epochs"
    return (f"[schedule] {length} (batch {batch} x accumulation {acc}: an update every {acc} iterations); "
            f"a checkpoint every {save:,} iterations ({save / acc:g} updates)", acc, save, evaluate)


def run(s: TrainSettings, out: str | Path | None = None, resume: bool = False,
        allow_unlearned: bool = False) -> Path:
    work = Path(s.work_dir)
    out = Path(out) if out else work / "merged"
    s = preflight(s)
    check_data(s)  # a bad file stops the run before an earlier one is moved aside
    prepare_work_dir(work, resume, out)
    data = prepare_data(s, work)
    changes: list = []
    config = write_config(_with(s, data_files=data), work / "config.py", changes)
    print(f"[config] {config} (prompt template {template_of(s)})")
    if changes:
        print(describe_changes(changes, s.base_config))
    line, acc, save_every, eval_every = schedule_line(config)
    print(line, flush=True)
    train(config, s, resume=resume)
    scoring = score_checkpoints(_with(s, data_files=data), config, acc)
    best = pick(scoring.scores, s)
    if best is not None:
        print(table(scoring.scores, best, s), flush=True)
    log = work / "train.log"
    verdict = judge(scoring.scores, best, s, scoring.skipped, acc, loss_trend(log), scoring.base_broken)
    report = summary(log, s.model_path, s.max_length if s.pack_to_max_length else 0, save_every, eval_every)
    if not verdict.learned and not allow_unlearned:
        print(report)
        raise NotLearned(verdict)
    device = "cuda" if s.profile == "gpu" else "cpu"
    if s.method == "full":
        export_full(config, dict(checkpoints(work))[best.iteration], out, Path(s.model_path), work / "convert.log")
    else:
        merge(s.model_path, work / "adapters" / f"iter_{best.iteration}", out, work / "merge.log", device)
    print(f"[done] merged model ({'iter_%d' % best.iteration} of {len(checkpoints(work))}): {out}")
    print(report)
    print(verdict.line() + ("" if verdict.learned else " (shipped anyway: --allow-unlearned)"), flush=True)
    return out


def _with(s: TrainSettings, **changes: object) -> TrainSettings:
    import dataclasses

    return dataclasses.replace(s, **changes)


_LOG = re.compile(r"Iter\(train\)\s*\[\s*(\d+)/\s*\d+\].*?time:\s*([\d.]+)(?:.*?memory:\s*(\d+))?")
_TFLOPS = re.compile(r"tflops:\s*([\d.]+)")
_TPS = re.compile(r"tokens_per_sec:\s*([\d.]+)")
_LOSS = re.compile(r"\bloss:\s*([\d.]+(?:e[-+]?\d+)?)")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "4090": 165.0, "A10": 125.0}  # dense bf16 / fp16 tensor core peaks


def model_flops_per_token(model_path: str | Path, seq_len: int) -> float | None:
    """Training FLOPs per token from the model's shape: 6 x the matmul parameters (every layer's
    projections and the output head; not the embedding lookup) plus causal attention,
    6 x layers x hidden x seq_len (PaLM's MFU, halved for the causal mask). Recomputation by
    activation checkpointing is not counted: this is model FLOPs, not hardware FLOPs."""
    c = model_shape(model_path)
    if c is None:
        return None
    h, layers, inter, vocab = (c[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = h // heads
    matmul = layers * (2 * h * h + 2 * h * kv * head_dim + 3 * h * inter) + vocab * h
    return 6.0 * matmul + 6.0 * layers * h * seq_len


def _log_rows(log: Path) -> list[tuple[int, float, int, float | None, float | None, float | None]]:
    """(iteration, seconds per iteration, memory MB, TFLOPs, tokens/s, loss) of each line of
    XTuner's log."""
    rows = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []:
        m = _LOG.search(line)
        if m:
            tf, tps, loss = _TFLOPS.search(line), _TPS.search(line), _LOSS.search(line)
            rows.append((int(m.group(1)), float(m.group(2)), int(m.group(3) or 0), float(tf.group(1)) if tf else None,
                         float(tps.group(1)) if tps else None, float(loss.group(1)) if loss else None))
    return rows


def loss_trend(log: Path) -> tuple[float, float] | None:
    """The first and the last training loss XTuner logged."""
    losses = [r[5] for r in _log_rows(log) if r[5] is not None]
    return (losses[0], losses[-1]) if losses else None


def summary(log: Path, model_path: str | Path | None = None, seq_len: int = 0, save_every: int = 0,
            eval_every: int = 0) -> str:
    """The loss from first to last, seconds per iteration, tokens/s per GPU, peak memory and MFU,
    from XTuner's log. Speed comes from training alone: the first logged interval (warm-up) and
    every interval holding a checkpoint save or an evaluation (`save_every`, `eval_every`
    iterations) are left out. MFU is model FLOPs (from the parameter count of `model_path`) x
    tokens/s over the GPU's dense bf16 peak; XTuner's own TFLOPs figure counts activation
    recomputation too, so it is shown as the hardware rate (on a GPU)."""
    rows = _log_rows(log)
    if not rows:
        return "[summary] no iteration lines in the training log"
    trend = loss_trend(log)

    def busy(prev: int, it: int) -> bool:  # an interval (prev, it] that saved or evaluated
        return any(every and (it // every) > (prev // every) for every in (save_every, eval_every))

    timed = [r for prev, r in zip([0] + [x[0] for x in rows], rows) if not busy(prev, r[0])][1:]
    timed = timed or rows[1:] or rows
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    secs, mem = mean([r[1] for r in timed]), max(r[2] for r in rows)
    tflops, tps = mean([r[3] for r in timed if r[3] is not None]), mean([r[4] for r in timed if r[4] is not None])
    peak = _peak_tflops()
    on_gpu = bool(peak or mem)  # XTuner logs memory on a GPU only: no TFLOPs figures for a CPU run
    per = "GPU" if on_gpu else "process"
    parts = [f"loss {trend[0]:.3g} -> {trend[1]:.3g} over {rows[-1][0]:,} iterations"] if trend else []
    parts.append(f"{secs:.3f} s/iter")
    if tps:
        parts.append(f"{tps:,.0f} tokens/s/{per} (training iterations only)")
    if mem:
        parts.append(f"peak memory {mem / 1024:.1f} GB")
    fpt = model_flops_per_token(model_path, seq_len) if model_path and tps and on_gpu else None
    if fpt:
        model_tflops = fpt * tps / 1e12
        parts.append(f"model {model_tflops:.1f} TFLOPs/{per}"
                     + (f", MFU {100 * model_tflops / peak:.1f} % of {peak:.0f}" if peak else ""))
    if tflops and tflops >= 0.05 and on_gpu:
        parts.append(f"XTuner's hardware estimate {tflops:.1f} TFLOPs")
    return "[summary] " + ", ".join(parts)


def _peak_tflops() -> float | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except Exception:
        return None
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML settings file (see training/settings.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--out", help="merged model folder (default: WORK_DIR/merged)")
    p.add_argument("--allow-unlearned", action="store_true",
                   help="merge and exit 0 even when the verdict is not 'learned'")
    a = p.parse_args(argv)
    try:
        with stoppable():
            return run_cli(lambda: run(load_settings(a.config, a.set), a.out, a.resume, a.allow_unlearned) and None,
                           errors=(StepFailed,))
    except NotLearned as exc:
        print(exc.verdict.line() + " (nothing shipped; --allow-unlearned merges it anyway)", flush=True)
        return NOT_LEARNED
    except Stopped as stop:
        where = f" at {stop.where}" if stop.where else ""
        work = Path(load_settings(a.config, a.set).work_dir)
        last = latest_checkpoint(work) if work.exists() else None
        resume = f"; --resume continues from {last.name}" if last else "; no checkpoint yet: a rerun starts over"
        print(f"[stopped] {stop}: {stop.step or 'the run'} stopped{where}, its processes with it{resume}",
              file=sys.stderr, flush=True)
        return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
