"""The real XTuner flow on the tiny model: pretrain briefly -> self-cognition data -> xtuner
train (LoRA, CPU) -> pick a checkpoint -> pth_to_hf -> merge. The training side runs in its own
environment (.venv-train, made by scripts/setup_train_env.sh); this side loads only the merged
folder, with the serving engine."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT, load_script
from infer_engine import EngineSettings, SamplingParams, create_engine

pytestmark = pytest.mark.slow
TRAIN_PY = ROOT / ".venv-train" / "bin" / "python"
NAME = "小测"


def train_env(*args: str, cwd=ROOT) -> str:
    if not TRAIN_PY.exists():
        pytest.fail("no training environment: run scripts/setup_train_env.sh (scripts/test.sh does)")
    r = subprocess.run([str(TRAIN_PY), *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    rand = load_script("build_tiny_model").build(tmp / "random", hidden=128)
    train_env("-m", "training.pretrain_tiny", rand, "--out", tmp / "base")
    train_env("-m", "training.data.generate_self_cognition", "--name", NAME, "--description",
              "由测试团队训练的助手", "--repeat", 3, "--mix", ROOT / "training/data/general_chat.jsonl",
              "--out", tmp / "self.jsonl")
    out = train_env("-m", "training.pipeline", "--config", ROOT / "training/examples/tiny_cpu.yaml",
                    "--set", f"model_path={tmp / 'base'}", "--set", f"data_files=[{tmp / 'self.jsonl'}]",
                    "--set", f"expected_answer={NAME}", "--set", f"work_dir={tmp / 'work'}",
                    "--out", tmp / "merged")
    return tmp, out


def ask(model, question: str) -> str:
    with create_engine(EngineSettings(model_path=str(model))) as engine:
        return engine.chat([{"role": "user", "content": question}],
                           SamplingParams(temperature=0, max_new_tokens=48))[0]


def test_merged_model_answers_with_the_new_identity(finetuned):
    tmp, _ = finetuned
    assert NAME in ask(tmp / "merged", "你是谁")
    assert NAME in ask(tmp / "merged", "Who are you?")
    assert NAME not in ask(tmp / "base", "你是谁")


def test_general_questions_still_answered(finetuned):
    tmp, _ = finetuned
    answer = ask(tmp / "merged", "请用一句话介绍上海")
    assert "上海" in answer and NAME not in answer


def test_pipeline_outputs(finetuned):
    tmp, log = finetuned
    assert "<- best" in log and "[done] merged model" in log
    work = tmp / "work"
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_100.pth", "iter_150.pth", "iter_50.pth"]
    adapter = work / "adapters" / "iter_50"
    assert (adapter / "adapter_model.safetensors").exists()  # not the fp16 .bin default
    cfg = json.loads((tmp / "merged" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "<|im_start|>" in cfg["chat_template"]
    assert not list(tmp.glob("**/*.partial"))


def test_later_turns_are_answered_too(finetuned):
    """The demo model was trained on single turns only: its second answer was noise. Pretraining
    and the mixed-in general chats now hold conversations of two and three turns."""
    tmp, _ = finetuned
    with create_engine(EngineSettings(model_path=str(tmp / "merged"))) as engine:
        history, answers = [], []
        for question in ("你好", "你是谁", "请用一句话介绍上海"):
            history.append({"role": "user", "content": question})
            answer = engine.chat(history, SamplingParams(temperature=0, max_new_tokens=48))[0]
            history.append({"role": "assistant", "content": answer})
            answers.append(answer)
    assert "你好" in answers[0] and NAME not in answers[0]
    assert NAME in answers[1]
    assert "上海" in answers[2] and NAME not in answers[2]
