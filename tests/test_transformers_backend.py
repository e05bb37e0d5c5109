"""transformers-specific behaviour: a LoRA adapter served unmerged through peft, continuous
batching, the one-stream path (a static cache, compiled on a GPU), generate() beside the batch."""
from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from infer_engine import EngineSettings, SamplingParams, create_engine

MSGS = [{"role": "user", "content": "你是谁"}]
SP = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
CUDA = torch.cuda.is_available()


def settings(model, **kw) -> EngineSettings:
    """The transformers backend (auto picks LMDeploy on a GPU), in fp32 where a test compares
    tokens across paths: exact on a CPU, and on a GPU too (bf16 rounds each batch shape its way).
    The one-stream compile is off unless a test turns it on (the conformance suite runs it on a
    GPU; each engine would compile anew)."""
    s = EngineSettings(model_path=str(model), backend="transformers", dtype="float32")
    s.transformers.compile = "off"
    for key, value in kw.items():
        target, _, leaf = key.rpartition("__")
        setattr(getattr(s, target) if target else s, leaf, value)
    return s


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
    with create_engine(settings(tiny_model)) as base:
        base_text, _ = base.chat(MSGS, SP)
    with create_engine(settings(tiny_model, adapter_path=str(adapter_dir))) as eng:
        from peft import PeftModel
        assert isinstance(eng.model, PeftModel)
        lora_text, _ = eng.chat(MSGS, SP)
    with create_engine(settings(merged_dir)) as merged:
        merged_text, _ = merged.chat(MSGS, SP)
    assert lora_text != base_text
    assert lora_text == merged_text


def test_seeded_sampling_is_reproducible(tiny_model):
    with create_engine(settings(tiny_model)) as eng:
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

    with create_engine(settings(tiny_model)) as eng:
        assert eng.max_concurrency == (64 if CUDA else 8)
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
    with create_engine(settings(tiny_model, transformers__max_batch_size=1)) as eng:
        assert eng.max_concurrency == 1 and eng._batcher is None
        text, usage = eng.chat(MSGS, SP)
    with create_engine(settings(tiny_model)) as batched:
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


def test_a_lone_request_takes_the_static_cache_path_and_says_the_same(tiny_internlm2):
    """compile on (auto on a GPU; on a CPU the static cache runs uncompiled): a request alone
    decodes through the static cache, requests together go to the batch, all greedy-equal."""
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    with create_engine(settings(tiny_internlm2, transformers__compile="off")) as plain:
        expected = [plain.chat(p, SP)[0] for p in prompts]
    with create_engine(settings(tiny_internlm2, transformers__compile="on")) as eng:
        assert eng._static_cache is not None
        used = []
        original = eng._generate_alone
        eng._generate_alone = lambda gen: (used.append(gen.session_id), (yield from original(gen)))[1]
        assert [eng.chat(p, SP, f"one-{i}")[0] for i, p in enumerate(prompts)] == expected  # one after another
        assert used == [f"one-{i}" for i in range(4)]
        used.clear()
        out: list = [None] * 4
        barrier = threading.Barrier(4)

        def run(i: int) -> None:
            barrier.wait()
            out[i] = eng.chat(prompts[i], SP, f"together-{i}")[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out == expected
        assert len(used) < 4  # the others were batched while one ran alone


def test_generate_beside_the_batch_computes_what_it_computes_alone(tiny_model):
    """A penalised request runs through generate() while the batch decodes: transformers sets
    is_causal on the model's config during a batch step, so on one shared model a generate()
    beside it attended to the future (seen: other tokens). The batch runs on its own twin."""
    penalised = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=0.5)
    long = SamplingParams(max_new_tokens=2000, temperature=0, ignore_eos=True)
    with create_engine(settings(tiny_model)) as eng:
        expected = eng.chat(MSGS, penalised)[0]
        stream = eng.stream_chat([{"role": "user", "content": "a long story"}], long, "batched")
        next(stream)  # the batch is decoding
        during = [eng.chat(MSGS, penalised, f"p{i}")[0] for i in range(3)]
        assert eng.running_sessions() == ["batched"]
        stream.close()
    assert during == [expected] * 3


def test_a_seeded_request_samples_the_same_while_the_batch_samples_beside_it(tiny_model):
    """A seed is the request's own generator: the batch drawing from the global RNG at the same
    time (it did: other tokens) changes nothing, and no one waits for anyone."""
    seeded = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=0, seed=42, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=2000, temperature=1.0, ignore_eos=True)
    with create_engine(settings(tiny_model)) as eng:
        expected = eng.chat(MSGS, seeded)[0]
        streams = [eng.stream_chat([{"role": "user", "content": f"story {i}"}], sampled, f"b{i}") for i in range(3)]
        for stream in streams:
            next(stream)  # three replies are being sampled in the batch
        got = [eng.chat(MSGS, seeded, f"seeded-{i}")[0] for i in range(3)]
        assert sorted(eng.running_sessions()) == ["b0", "b1", "b2"]
        for stream in streams:
            stream.close()
        other = eng.chat(MSGS, SamplingParams(**{**seeded.__dict__, "seed": 7}))[0]
    assert got == [expected] * 3 and other != expected
