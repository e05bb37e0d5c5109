"""The tiny offline model: real files a user could point any backend at."""
from __future__ import annotations

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import load_script


def test_tiny_model_folder_is_complete(tiny_model):
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert not [p for p in tiny_model.parent.iterdir() if p.name.startswith(".")]  # no temp left
    cfg = json.loads((tiny_model / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]  # readable by older transformers and LMDeploy


def test_tokenizer_has_internlm2_special_tokens(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for t in ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|interpreter|>", "<|plugin|>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<s>"
    assert tok.encode("hi")[0] == tok.bos_token_id  # BOS on add_special_tokens=True
    assert tok.decode(tok.encode("你是谁? Who are you?", add_special_tokens=False)) == "你是谁? Who are you?"


def test_build_is_deterministic(tiny_model, tmp_path):
    other = load_script("build_tiny_model").build(tmp_path / "again")
    a = AutoModelForCausalLM.from_pretrained(tiny_model)
    b = AutoModelForCausalLM.from_pretrained(other)
    assert all((x == y).all() for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
