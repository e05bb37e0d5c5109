"""The whole fine-tuning flow in one command: check what is needed -> validate data -> render
config -> xtuner train -> score checkpoints and pick one -> convert -> merge into a model folder
the serving side loads -> a summary of throughput from XTuner's log.

    python -m training.pipeline --config train.yaml [--set key=value ...] [--resume] [--out DIR]

A run without --resume starts afresh: the work dir's checkpoints, adapters and logs of an
earlier run are moved to WORK_DIR/previous (a rerun with edited data never ships old weights).
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import sys
import time
from pathlib import Path

from .config import builtin_config, model_shape, template_of, write_config
from .data.io import DataError, run_cli, write_jsonl
from .data.validate import samples, validate
from .run import StepFailed, checkpoints, export_full, merge, train
from .select import pick, score_checkpoints, table
from .settings import TrainSettings, load_settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def preflight(s: TrainSettings) -> None:
    """What the run needs, checked before anything runs: one line saying what is missing."""
    builtin_config(s.base_config)  # an unknown name is reported now, not after the data check
    if not Path(s.model_path).expanduser().exists() and not HUB_ID.match(s.model_path):
        raise DataError(f"model_path: {s.model_path}: no such folder (nor an owner/name hub id)")
    for f in s.data_files:
        if not Path(f).is_file():
            raise DataError(f"data_files: {f}: no such file")
    warn_template_mismatch(s)
    if s.profile == "cpu":
        return
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


def prepare_work_dir(work: Path, resume: bool) -> None:
    """A fresh run moves an earlier run's checkpoints, adapters and logs aside."""
    work.mkdir(parents=True, exist_ok=True)
    if resume:
        return
    old = [p for p in work.iterdir() if p.name in ("adapters", "last_checkpoint", "train.log", "convert.log",
                                                   "merge.log", "config.py", "data")
           or re.fullmatch(r"iter_\d+\.pth", p.name) or re.fullmatch(r"\d{8}_\d{6}", p.name)]
    if not old:
        return
    dest = work / "previous" / time.strftime("%Y%m%d_%H%M%S")
    dest.mkdir(parents=True)
    for p in old:
        shutil.move(str(p), dest / p.name)
    print(f"[work] a fresh run: the earlier run's {len(old)} files moved to {dest} (--resume continues it)")


def prepare_data(s: TrainSettings, work: Path) -> list[str]:
    """Validate every data file (JSONL or a JSON array; messages or XTuner conversations) and
    write it as messages JSONL for XTuner's openai_map_fn; returns the files training reads."""
    from transformers import AutoTokenizer
    from xtuner.utils import PROMPT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(s.model_path, trust_remote_code=True)
    template = dict(PROMPT_TEMPLATE[template_of(s)])
    out = []
    for i, f in enumerate(s.data_files):
        r = validate(f, tok, s.max_length, template)
        print(f"[data] {f}: {r.samples} samples, longest {r.max_tokens} tokens (max_length {s.max_length})")
        target = work / "data" / f"{i}_{Path(f).stem}.jsonl"
        write_jsonl(target, ({"messages": msgs} for _, msgs in samples(f)))
        out.append(str(target))
    return out


def run(s: TrainSettings, out: str | Path | None = None, resume: bool = False) -> Path:
    work = Path(s.work_dir)
    out = Path(out) if out else work / "merged"
    preflight(s)
    prepare_work_dir(work, resume)
    data = prepare_data(s, work)
    config = write_config(_with(s, data_files=data), work / "config.py")
    print(f"[config] {config} (prompt template {template_of(s)})")
    train(config, s, resume=resume)
    scores = score_checkpoints(s, config)
    best = pick(scores, s)
    print(table(scores, best, s), flush=True)
    device = "cuda" if s.profile == "gpu" else "cpu"
    if s.method == "full":
        export_full(config, dict(checkpoints(work))[best.iteration], out, Path(s.model_path), work / "convert.log")
    else:
        merge(s.model_path, work / "adapters" / f"iter_{best.iteration}", out, work / "merge.log", device)
    print(f"[done] merged model ({'iter_%d' % best.iteration} of {len(checkpoints(work))}): {out}")
    print(summary(work / "train.log", s.model_path, s.max_length if s.pack_to_max_length else 0))
    return out


def _with(s: TrainSettings, **changes: object) -> TrainSettings:
    import dataclasses

    return dataclasses.replace(s, **changes)


_LOG = re.compile(r"Iter\(train\)\s*\[\s*(\d+)/\s*\d+\].*?time:\s*([\d.]+)(?:.*?memory:\s*(\d+))?")
_TFLOPS = re.compile(r"tflops:\s*([\d.]+)")
_TPS = re.compile(r"tokens_per_sec:\s*([\d.]+)")
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


def summary(log: Path, model_path: str | Path | None = None, seq_len: int = 0) -> str:
    """Seconds per iteration, tokens/s per GPU, peak memory and MFU, from XTuner's log (the
    first logged interval, warm-up, left out). MFU is model FLOPs (from the parameter count of
    `model_path`) x tokens/s over the GPU's dense bf16 peak; XTuner's own TFLOPs figure counts
    activation recomputation too, so it is shown as the hardware rate."""
    rows = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []:
        m = _LOG.search(line)
        if m:
            tf, tps = _TFLOPS.search(line), _TPS.search(line)
            rows.append((float(m.group(2)), int(m.group(3) or 0), float(tf.group(1)) if tf else None,
                         float(tps.group(1)) if tps else None))
    if not rows:
        return "[summary] no iteration lines in the training log"
    rows = rows[1:] or rows
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    secs, mem = mean([r[0] for r in rows]), max(r[1] for r in rows)
    tflops, tps = mean([r[2] for r in rows if r[2] is not None]), mean([r[3] for r in rows if r[3] is not None])
    peak = _peak_tflops()
    per = "GPU" if peak or mem else "process"
    parts = [f"{secs:.3f} s/iter"]
    if tps:
        parts.append(f"{tps:,.0f} tokens/s/{per}")
    if mem:
        parts.append(f"peak memory {mem / 1024:.1f} GB")
    fpt = model_flops_per_token(model_path, seq_len) if model_path and tps else None
    if fpt:
        model_tflops = fpt * tps / 1e12
        parts.append(f"model {model_tflops:.1f} TFLOPs/{per}"
                     + (f", MFU {100 * model_tflops / peak:.1f} % of {peak:.0f}" if peak else ""))
    if tflops and tflops >= 0.05:
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
    a = p.parse_args(argv)

    def work() -> None:
        run(load_settings(a.config, a.set), a.out, a.resume)
    return run_cli(work, errors=(StepFailed,))


if __name__ == "__main__":
    sys.exit(main())
