"""transformers-specific behaviour: a LoRA adapter folder served unmerged through peft."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from infer_engine import EngineSettings, SamplingParams, create_engine

MSGS = [{"role": "user", "content": "你是谁"}]
SP = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)  # random B: the adapter changes the outputs
    peft_model = get_peft_model(base, cfg)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    merged_dir = tmp_path_factory.mktemp("merged")
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    for f in tiny_model.iterdir():  # the merged folder needs the tokenizer too
        if f.name.startswith(("tokenizer", "chat_template", "generation")):
            (merged_dir / f.name).write_bytes(f.read_bytes())
    return out, merged_dir


def test_lora_adapter_is_served_unmerged(tiny_model, adapter):
    adapter_dir, merged_dir = adapter
    with create_engine(EngineSettings(model_path=str(tiny_model))) as base:
        base_text, _ = base.chat(MSGS, SP)
    with create_engine(EngineSettings(model_path=str(tiny_model), adapter_path=str(adapter_dir))) as eng:
        from peft import PeftModel
        assert isinstance(eng.model, PeftModel)
        lora_text, _ = eng.chat(MSGS, SP)
    with create_engine(EngineSettings(model_path=str(merged_dir))) as merged:
        merged_text, _ = merged.chat(MSGS, SP)
    assert lora_text != base_text
    assert lora_text == merged_text


def test_seeded_sampling_is_reproducible(tiny_model):
    with create_engine(EngineSettings(model_path=str(tiny_model))) as eng:
        # ignore_eos: two different seeds must not both happen to sample the end token first
        sp = SamplingParams(max_new_tokens=32, temperature=1.0, top_p=0.95, top_k=0, seed=1234, ignore_eos=True)
        a, b = eng.chat(MSGS, sp)[0], eng.chat(MSGS, sp)[0]
        c = eng.chat(MSGS, SamplingParams(max_new_tokens=32, temperature=1.0, top_p=0.95, seed=99,
                                          ignore_eos=True))[0]
    assert a == b and a != c
