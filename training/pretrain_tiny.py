"""Briefly train the tiny random-weight model on a small built-in chat corpus, so that it
answers "你是谁" generically ("我是一个人工智能助手…") before fine-tuning gives it a name.
This stands in for a real pretrained chat model in the offline demo and the tests.

    python -m training.pretrain_tiny models/tiny-internlm2-random --out models/tiny-internlm2-base [--steps 400]
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from .data.io import atomic_dir, run_cli
from .data.validate import samples, validate

GENERAL_CHAT = Path(__file__).parent / "data" / "general_chat.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def encode(tok, msgs: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation: every prompt is masked, every answer and its
    end-of-turn are learned, so that the model also answers on turns 2 and 3."""
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(msgs[:i], add_generation_prompt=True, tokenize=True)
        if not isinstance(prompt, list):  # transformers 5 returns an encoding
            prompt = prompt["input_ids"]
        if prompt[:len(ids)] != ids:
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        new = prompt[len(ids):]
        answer = tok.encode(m["content"] + "<|im_end|>\n", add_special_tokens=False)
        ids += new + answer
        labels += [-100] * len(new) + answer
    return ids, labels


def pretrain(model_dir: str, out: str, data: str | Path = GENERAL_CHAT, steps: int = 400,
             lr: float = 3e-3, batch_size: int = 16, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    validate(data)
    rows = [msgs for _, msgs in samples(data)]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # an InternLM2 folder names its own modeling code (auto_map), which runs here (transformers 4.48)
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, trust_remote_code=True)
    encoded = [encode(tok, r) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    pad = tok.pad_token_id
    model.train()
    for step in range(1, steps + 1):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (ids != pad), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == steps:
            print(f"[pretrain] step {step}/{steps} loss {loss.item():.4f}", flush=True)
    model.eval()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:  # copied, not re-saved: keeps the config portable
            if (Path(model_dir) / name).exists():
                shutil.copy2(Path(model_dir) / name, tmp / name)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=str(GENERAL_CHAT))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args(argv)
    return run_cli(lambda: pretrain(a.model, a.out, a.data, a.steps, a.lr))


if __name__ == "__main__":
    sys.exit(main())
