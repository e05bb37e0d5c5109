"""The whole fine-tuning flow in one command: validate data -> render config -> xtuner train ->
score checkpoints and pick one -> convert -> merge into a model folder the serving side loads.

    python -m training.pipeline --config train.yaml [--set key=value ...] [--resume] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import write_config
from .data.io import run_cli
from .data.validate import validate
from .run import StepFailed, checkpoints, merge, train
from .select import pick, score_checkpoints, table
from .settings import TrainSettings, load_settings


def validate_data(s: TrainSettings) -> None:
    from transformers import AutoTokenizer
    from xtuner.utils import PROMPT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(s.model_path, trust_remote_code=True)
    template = dict(PROMPT_TEMPLATE[s.prompt_template])
    for f in s.data_files:
        r = validate(f, tok, s.max_length, template)
        print(f"[data] {f}: {r.samples} samples, longest {r.max_tokens} tokens (max_length {s.max_length})")


def run(s: TrainSettings, out: str | Path | None = None, resume: bool = False) -> Path:
    work = Path(s.work_dir)
    out = Path(out) if out else work / "merged"
    validate_data(s)
    config = write_config(s, work / "config.py")
    print(f"[config] {config}")
    train(config, s, resume=resume)
    scores = score_checkpoints(s, config)
    best = pick(scores, s)
    print(table(scores, best, s), flush=True)
    device = "cuda" if s.profile == "gpu" else "cpu"
    merge(s.model_path, work / "adapters" / f"iter_{best.iteration}", out, work / "merge.log", device)
    print(f"[done] merged model ({'iter_%d' % best.iteration} of {len(checkpoints(work))}): {out}")
    return out


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
