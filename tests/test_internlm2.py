"""InternLM2, the tutorials' family, on the serving stack: its folder names its own code (written
for transformers 4.x); transformers 5 serves it with its own Llama classes. Checked against that
very code, run in the training environment (XTuner's copy on transformers 4.48)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_script, train_env
from infer_engine import EngineSettings, InvalidRequest, SamplingParams, create_engine
from infer_engine.architectures import native_model

# InternLM2's own forward (its modeling file in the folder, transformers 4.48): logits as JSON
REFERENCE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, torch_dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model)
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    print(json.dumps(model(input_ids=ids).logits[0, -8:].tolist()))
"""

# An adapter on InternLM2's own modules, as XTuner trains it, and the model with it merged
ADAPTER = """
import shutil, sys, torch
from pathlib import Path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
base, adapter, merged = map(Path, sys.argv[1:4])
targets = sys.argv[4] if sys.argv[4] == "all-linear" else sys.argv[4].split(",")
torch.manual_seed(1)
model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True, torch_dtype=torch.float32)
peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, init_lora_weights=False, target_modules=targets))
peft_model.save_pretrained(adapter)
peft_model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
for f in base.iterdir():
    if f.name.startswith(("tokenizer", "chat_template", "generation")):
        shutil.copy2(f, merged / f.name)
"""


@pytest.fixture(scope="module")
def short_window(tmp_path_factory):
    """An InternLM2 whose max_position_embeddings is 64, so its dynamic NTK RoPE is reached."""
    return load_script("build_tiny_model").build(tmp_path_factory.mktemp("il2") / "short", arch="internlm2",
                                                 max_positions=64)


def reference_logits(folder, ids) -> torch.Tensor:
    return torch.tensor(json.loads(train_env("-c", REFERENCE, folder, json.dumps(ids))))


def native_logits(folder, ids, session_len: int) -> torch.Tensor:
    native = native_model(str(folder), session_len)
    model = native.model_class.from_pretrained(str(folder), config=native.config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -8:]


def test_the_fixture_is_laid_out_as_the_hub_repos_are(tiny_internlm2):
    from safetensors import safe_open

    config = json.loads((tiny_internlm2 / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "internlm2" and config["architectures"] == ["InternLM2ForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert (tiny_internlm2 / "modeling_internlm2.py").is_file() and (tiny_internlm2 / "configuration_internlm2.py").is_file()
    with safe_open(str(tiny_internlm2 / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.attention.wqkv.weight" in names and "output.weight" in names
    assert not any("q_proj" in n for n in names)
    tok = json.loads((tiny_internlm2 / "tokenizer_config.json").read_text(encoding="utf-8"))
    gen = json.loads((tiny_internlm2 / "generation_config.json").read_text(encoding="utf-8"))
    assert tok["eos_token"] == "</s>" and len(gen["eos_token_id"]) == 2  # </s> and <|im_end|>


def test_transformers_computes_what_internlm2s_own_code_computes(short_window):
    ids = [1, 7, 33, 90, 250, 4, 17] * 6  # 42 tokens: within the 64-position window
    expected = reference_logits(short_window, ids)
    assert torch.allclose(native_logits(short_window, ids, session_len=64), expected, atol=1e-4)
    # past the window InternLM2 scales RoPE's base (dynamic NTK); served so when the context allows it
    long_ids = ids * 3  # 126 tokens
    expected = reference_logits(short_window, long_ids)
    assert torch.allclose(native_logits(short_window, long_ids, session_len=256), expected, atol=1e-4)
    plain = native_logits(short_window, long_ids, session_len=64)  # plain RoPE: the test can tell
    assert not torch.allclose(plain, expected, atol=1e-2)


def test_no_code_from_the_model_folder_runs_when_serving(tiny_internlm2):
    code = ("import sys; from infer_engine import EngineSettings, SamplingParams, create_engine\n"
            f"e = create_engine(EngineSettings(model_path={str(tiny_internlm2)!r}, backend='transformers'))\n"
            "print(repr(e.chat([{'role': 'user', 'content': 'hi'}], SamplingParams(max_new_tokens=4))[0]))\n"
            "print(sorted(m for m in sys.modules if m.startswith('transformers_modules')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


# XTuner's own default for InternLM2 (its head included), and PEFT's all-linear (full module paths)
# which the pipeline renders
@pytest.mark.parametrize("targets", ["wqkv,wo,w1,w2,w3,output", "all-linear"])
def test_a_lora_adapter_on_internlm2s_own_modules_is_served_unmerged(tiny_internlm2, tmp_path, targets):
    train_env("-c", ADAPTER, tiny_internlm2, tmp_path / "adapter", tmp_path / "merged", targets)
    msgs, sp = [{"role": "user", "content": "你是谁"}], SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)

    def answer(**kw) -> str:
        with create_engine(EngineSettings(backend="transformers", dtype="float32", **kw)) as engine:
            return engine.chat(msgs, sp)[0]

    lora = answer(model_path=str(tiny_internlm2), adapter_path=str(tmp_path / "adapter"))
    assert lora == answer(model_path=str(tmp_path / "merged"))
    assert lora != answer(model_path=str(tiny_internlm2))


def test_a_tokenizer_that_is_code_runs_only_when_allowed(tiny_internlm2, tmp_path):
    folder = tmp_path / "hub-like"
    shutil.copytree(tiny_internlm2, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(tokenizer_class="InternLM2Tokenizer", auto_map={"AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer", "tokenization_internlm2_fast.InternLM2TokenizerFast"]})
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(InvalidRequest) as err:
        create_engine(EngineSettings(model_path=str(folder), backend="transformers"))
    assert err.value.param == "trust_remote_code" and "InternLM2Tokenizer" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU loads it")
def test_4_bit_loading_is_refused_on_a_cpu(tiny_internlm2):
    with pytest.raises(InvalidRequest) as err:
        create_engine(EngineSettings(model_path=str(tiny_internlm2), bits=4))
    assert err.value.param == "bits" and "CUDA" in str(err.value)
