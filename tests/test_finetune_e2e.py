"""The real XTuner flow on the tiny model: pretrain briefly -> self-cognition data -> xtuner
train (LoRA, CPU) -> pick a checkpoint -> pth_to_hf -> merge. The training side runs in its own
environment (.venv-train, made by scripts/setup_train_env.sh); this side loads only the merged
folder, with the serving engine. The model is an InternLM2, the tutorials' family (its own code
runs in training; serving loads it with transformers' own classes); the Qwen2 path too."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT, TRAIN_PY, load_script, train_env
from infer_engine import EngineSettings, SamplingParams, create_engine

pytestmark = pytest.mark.slow
NAME = "小测"


def finetune(tmp, arch: str) -> str:
    """build -> pretrain -> self-cognition data -> the pipeline, as scripts/demo.sh runs them."""
    rand = load_script("build_tiny_model").build(tmp / "random", hidden=128, arch=arch)
    train_env("-m", "training.pretrain_tiny", rand, "--out", tmp / "base")
    train_env("-m", "training.data.generate_self_cognition", "--name", NAME, "--description",
              "由测试团队训练的助手", "--repeat", 3, "--mix", ROOT / "training/data/general_chat.jsonl",
              "--out", tmp / "self.jsonl")
    out = train_env("-m", "training.pipeline", "--config", ROOT / "training/examples/tiny_cpu.yaml",
                    "--set", f"model_path={tmp / 'base'}", "--set", f"data_files=[{tmp / 'self.jsonl'}]",
                    "--set", f"expected_answer={NAME}", "--set", f"work_dir={tmp / 'work'}",
                    "--out", tmp / "merged")
    return out


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    return tmp, finetune(tmp, "internlm2")


def ask(model, question: str) -> str:
    with create_engine(EngineSettings(model_path=str(model))) as engine:
        return engine.chat([{"role": "user", "content": question}],
                           SamplingParams(temperature=0, max_new_tokens=48))[0]


def test_merged_model_answers_with_the_new_identity(finetuned):
    tmp, _ = finetuned
    config = json.loads((tmp / "merged" / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "internlm2" and "auto_map" in config  # what XTuner's merge wrote
    assert NAME in ask(tmp / "merged", "你是谁")
    assert NAME in ask(tmp / "merged", "Who are you?")
    assert NAME not in ask(tmp / "base", "你是谁")


def test_the_qwen2_path_learns_the_identity_too(tmp_path):
    log = finetune(tmp_path, "qwen2")
    assert "[done] merged model" in log
    assert NAME in ask(tmp_path / "merged", "你是谁") and NAME not in ask(tmp_path / "base", "你是谁")


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
    # merged in the base's dtype (XTuner's merge tool writes float16 whatever the base)
    assert json.loads((tmp / "merged" / "config.json").read_text(encoding="utf-8"))["torch_dtype"] == "float32"
    assert not list(tmp.glob("**/*.partial"))
    # the readable config stays; mmengine's flattened dump of it is beside it
    assert (work / "config.py").read_text(encoding="utf-8").startswith("# Rendered from XTuner's")
    assert (work / "config_as_run.py").exists()
    assert "[verdict] learned: iter_" in log and "[schedule] 150 iterations = 150 optimizer updates" in log
    assert "[config] changed from internlm2_chat_1_8b_qlora_alpaca_e3:" in log and "loss " in log


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


TUTORIAL_SCRIPT = '''import json
name = '小红'
n = 2000
data = [{"conversation": [{"input": "请做一下自我介绍", "output": "我是{}的小助手，内在是书生·浦语的大模型哦".format(name)}]}]
for i in range(n):
    data.append(data[0])
with open('personal_assistant.json', 'w', encoding='utf-8') as f:
    json.dump(data, f, ensure_ascii=False, indent=4)
'''


@pytest.fixture(scope="module")
def tutorial_run(finetuned):
    """The bootcamp's own generate_data.py output (a JSON array of XTuner conversations) and an
    InternLM-1 built-in config, through the pipeline as they are."""
    tmp, _ = finetuned
    (tmp / "generate_data.py").write_text(TUTORIAL_SCRIPT, encoding="utf-8")
    subprocess.run([str(TRAIN_PY), "generate_data.py"], cwd=tmp, check=True)
    args = ["-m", "training.pipeline", "--config", ROOT / "training/examples/tiny_cpu.yaml",
            "--set", "base_config=internlm_chat_7b_qlora_oasst1_e3", "--set", "prompt_template=",
            "--set", f"model_path={tmp / 'base'}",
            "--set", f"data_files=[{tmp / 'personal_assistant.json'}]", "--set", "expected_answer=小红",
            "--set", "evaluation_inputs=[请做一下自我介绍]", "--set", "max_steps=40", "--set", "save_steps=20",
            "--set", f"work_dir={tmp / 'tutorial'}"]
    return tmp, args, train_env(*args, "--out", tmp / "tutorial_merged")


def test_the_tutorials_files_and_an_internlm1_config_go_through(tutorial_run):
    tmp, _, log = tutorial_run
    assert "personal_assistant.json: 2001 samples" in log and "(prompt template internlm_chat)" in log
    # the tiny model's own format is ChatML: the run says the served prompts will differ
    assert "[warning] prompt template internlm_chat writes <|User|>" in log
    assert "prompt_template = PROMPT_TEMPLATE.internlm_chat\n" in (tmp / "tutorial" / "config.py").read_text(encoding="utf-8")
    assert "PROMPT_TEMPLATE.internlm_chat'" in (tmp / "tutorial" / "config_as_run.py").read_text(encoding="utf-8")
    assert "mostly duplicates: 2,001 records, 1 distinct" in log
    assert "[summary]" in log and "s/iter" in log


def test_resume_continues_from_the_last_checkpoint(tutorial_run):
    tmp, args, _ = tutorial_run
    log = train_env(*[a if a != "max_steps=40" else "max_steps=60" for a in args], "--resume",
                    "--out", tmp / "tutorial_resumed")
    work = tmp / "tutorial"
    assert (work / "iter_60.pth").exists() and "iter_60" in log
    text = (work / "train.log").read_text(encoding="utf-8")
    assert "resumed" in text.lower() and "Weights only load failed" not in text


def test_full_fine_tuning_ships_a_whole_model(finetuned):
    tmp, _ = finetuned
    log = train_env("-m", "training.pipeline", "--config", ROOT / "training/examples/tiny_cpu.yaml",
                    "--set", "method=full", "--set", "lr=0.001", "--set", "max_steps=60", "--set", "save_steps=30",
                    "--set", f"model_path={tmp / 'base'}", "--set", f"data_files=[{tmp / 'self.jsonl'}]",
                    "--set", f"expected_answer={NAME}", "--set", f"work_dir={tmp / 'full'}", "--out", tmp / "full_model")
    assert "[done] merged model" in log
    model = tmp / "full_model"
    assert (model / "model.safetensors").exists() and not (model / "adapter_config.json").exists()
    assert "<|im_start|>" in json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert ask(model, "你是谁")  # loads and answers in the serving environment


def pipeline(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(TRAIN_PY), "-m", "training.pipeline", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)


def test_a_run_that_learned_nothing_ships_nothing_and_exits_non_zero(finetuned):
    tmp, _ = finetuned
    args = ["--config", ROOT / "training/examples/tiny_cpu.yaml", "--set", f"model_path={tmp / 'base'}",
            "--set", f"data_files=[{tmp / 'self.jsonl'}]", "--set", f"expected_answer={NAME}", "--set", "lr=1e-9",
            "--set", "max_steps=10", "--set", "save_steps=5", "--set", f"work_dir={tmp / 'unlearned'}"]
    r = pipeline(*args, "--out", tmp / "unlearned_model")
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"[verdict] did not learn: no checkpoint's answers hold '{NAME}'" in r.stdout
    assert "[done]" not in r.stdout and not (tmp / "unlearned_model").exists()
    r = pipeline(*args, "--out", tmp / "unlearned_model", "--allow-unlearned")
    assert r.returncode == 0 and (tmp / "unlearned_model" / "config.json").exists()
    assert "(shipped anyway: --allow-unlearned)" in r.stdout


def test_sigterm_stops_xtuners_training_and_resume_finishes_it(finetuned):
    import os
    import signal
    import time

    tmp, _ = finetuned
    work = tmp / "killed"
    args = ["--config", ROOT / "training/examples/tiny_cpu.yaml", "--set", f"model_path={tmp / 'base'}",
            "--set", f"data_files=[{tmp / 'self.jsonl'}]", "--set", f"expected_answer={NAME}",
            "--set", "max_steps=100", "--set", "save_steps=20", "--set", f"work_dir={work}"]
    proc = subprocess.Popen([str(TRAIN_PY), "-m", "training.pipeline", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (work / "iter_20.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:] + err[-2000:]
    assert "[stopped] SIGTERM: train stopped at iteration" in err and "--resume continues from iter_" in err
    left = [p for p in os.listdir("/proc") if p.isdigit() and str(work) in _cmdline(p)]
    assert not left  # no trainer left writing checkpoints
    r = pipeline(*args, "--resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (work / "iter_100.pth").exists() and "[verdict] learned" in r.stdout


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
