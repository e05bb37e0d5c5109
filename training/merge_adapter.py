"""Merge a LoRA adapter into its base model, in the base model's own dtype:

    python -m training.merge_adapter BASE ADAPTER OUT [--device cpu] [--max-shard-size 2GB]

What `xtuner convert merge` does (PEFT's merge_and_unload, then save_pretrained with the base's
tokenizer; remote-code models keep their code files), without its fixed float16: a base in
float32 (the CPU profile) or bfloat16 (the hub's InternLM2) is merged and saved in that dtype.
XTuner's float16 merge shipped a model that answered otherwise than the checkpoint the pipeline
had scored (the tiny InternLM2: its third answer in a chat said the new name again).
"""
from __future__ import annotations

import argparse
import sys

from .data.io import run_cli


def merge(base: str, adapter: str, out: str, device: str = "cpu", max_shard_size: str = "2GB") -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype="auto", device_map=device,
                                                 low_cpu_mem_usage=True, trust_remote_code=True)
    merged = PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(base, trust_remote_code=True).save_pretrained(out)
    return f"merged {adapter} into {base} ({model.dtype}): {out}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-shard-size", default="2GB")
    a = p.parse_args(argv)
    return run_cli(lambda: merge(a.base, a.adapter, a.out, a.device, a.max_shard_size))


if __name__ == "__main__":
    sys.exit(main())
