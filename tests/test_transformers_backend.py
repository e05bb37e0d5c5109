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


def test_concurrent_sessions_are_decoded_together(tiny_model):
    """Continuous batching: with 8 sessions at once, every one has its first token before any
    of them finishes (run one after another, the first would be done before the last began)."""
    import threading

    with create_engine(EngineSettings(model_path=str(tiny_model))) as eng:
        assert eng.max_concurrency == 8
        firsts, ends, lock = [], [], threading.Lock()
        sp = SamplingParams(max_new_tokens=96, temperature=0, ignore_eos=True)

        def run(i: int) -> None:
            stream = eng.stream_chat([{"role": "user", "content": f"story {i}"}], sp, f"s{i}")
            next(stream)
            with lock:
                firsts.append(i)
            usage = list(stream)[-1].usage
            with lock:
                ends.append((i, len(firsts), usage.completion_tokens))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(tokens == 96 for _, _, tokens in ends)
    assert ends[0][1] == 8, f"the first session finished when only {ends[0][1]} of 8 had started"


def test_batch_size_one_runs_generate_one_at_a_time(tiny_model):
    s = EngineSettings(model_path=str(tiny_model))
    s.transformers.max_batch_size = 1
    with create_engine(s) as eng:
        assert eng.max_concurrency == 1 and eng._batcher is None
        text, usage = eng.chat(MSGS, SP)
    with create_engine(EngineSettings(model_path=str(tiny_model))) as batched:
        assert batched.chat(MSGS, SP)[0] == text  # the same greedy tokens either way
    assert usage.completion_tokens == 24


def test_openai_penalties_count_the_reply_only():
    import torch

    from infer_engine.transformers_backend import _OpenAIPenalties

    ids = torch.tensor([[5, 5, 1, 1, 2]])  # prompt [5, 5], reply [1, 1, 2]
    scores = torch.zeros(1, 6)
    out = _OpenAIPenalties(prompt_len=2, frequency=0.5, presence=1.0)(ids, scores)
    # token 1 twice: -(0.5*2 + 1); token 2 once: -(0.5 + 1); token 5 is the prompt's: untouched
    assert out.tolist() == [[0.0, -2.0, -1.5, 0.0, 0.0, 0.0]]
