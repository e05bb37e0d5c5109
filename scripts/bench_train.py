"""Training throughput of one settings file at several shapes, side by side in one run.

    python scripts/bench_train.py --config training/examples/internlm2_chat_1_8b_qlora.yaml \
        --set model_path=BASE --set data_files=[data.jsonl] --steps 12 \
        --shape method=lora,max_length=4096 \
        --shape method=lora,max_length=8192,activation_checkpointing=false

Each shape trains `--steps` iterations through XTuner's own train tool (no selection, no
conversion) and prints the pipeline's [summary] line: s/iter, tokens/s/GPU, peak memory, MFU
from the parameter count. Run it in the training environment on the GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import write_config  # noqa: E402
from training.pipeline import prepare_data, prepare_work_dir, summary  # noqa: E402
from training.run import StepFailed, train  # noqa: E402
from training.settings import load_settings  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--shape", action="append", required=True, metavar="KEY=VALUE,KEY=VALUE",
                   help="settings of one measured shape (repeat)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--work", default="work_dirs/bench_train")
    a = p.parse_args()
    rows = []
    for i, shape in enumerate(a.shape):
        # one optimizer update per batch unless the shape says otherwise: --steps counts batches here
        sets = ["accumulative_counts=1"] + a.set + [kv for kv in shape.split(",") if kv] + [
            f"max_steps={a.steps}", f"save_steps={a.steps}", f"evaluation_freq={10 * a.steps}",
            f"work_dir={a.work}/{i}"]
        # no sample generation by XTuner's chat hook: only training is timed
        s = dataclasses.replace(load_settings(a.config, sets), evaluation_inputs=[])
        work = Path(s.work_dir)
        prepare_work_dir(work, resume=False)
        data = prepare_data(s, work)
        config = write_config(dataclasses.replace(s, data_files=data), work / "config.py")
        try:
            train(config, s)
            line = summary(work / "train.log", s.model_path, s.max_length if s.pack_to_max_length else 0)
        except StepFailed as exc:
            line = "FAILED: " + str(exc).splitlines()[0]
        rows.append((shape, line))
        print(f"{shape}: {line}", flush=True)
    print("\n| shape | result |\n|---|---|")
    for shape, line in rows:
        print(f"| {shape} | {line.removeprefix('[summary] ')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
