"""The pipeline's parts that keep a tutorial user safe, without a training run: reruns, stale
adapters, the seeds' own files, templates, full fine-tuning's config, checkpoint selection,
the checks before anything runs, file modes, and the settings' small traps."""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from training.config import load_config, template_of, write_config
from training.data.io import DataError, write_jsonl
from training.data.validate import samples, validate
from training.pipeline import model_flops_per_token, preflight, prepare_work_dir, summary, warn_template_mismatch
from training.run import SOURCE, _stamp, converted
from training.select import Score, general_quality, pick, table
from training.settings import TrainSettings


def settings(tmp_path, **kw) -> TrainSettings:
    data = tmp_path / "d.jsonl"
    if not data.exists():
        write_jsonl(data, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    base = dict(model_path=str(tmp_path), data_files=[str(data)], work_dir=str(tmp_path / "work"),
                method="lora", profile="cpu")
    return TrainSettings(**{**base, **kw}).validate()


# 1. a rerun into the same work dir never ships the first run's weights

def test_a_fresh_run_moves_the_earlier_run_aside(tmp_path):
    work = tmp_path / "work"
    (work / "adapters" / "iter_10").mkdir(parents=True)
    for name in ("iter_10.pth", "train.log", "last_checkpoint"):
        (work / name).write_text("old")
    prepare_work_dir(work, resume=True)
    assert (work / "iter_10.pth").exists()  # --resume keeps everything
    prepare_work_dir(work, resume=False)
    assert not (work / "iter_10.pth").exists() and not (work / "adapters").exists() and not (work / "train.log").exists()
    (moved,) = (work / "previous").iterdir()
    assert sorted(p.name for p in moved.iterdir()) == ["adapters", "iter_10.pth", "last_checkpoint", "train.log"]


def test_an_adapter_counts_only_for_the_checkpoint_it_came_from(tmp_path):
    pth, adapter = tmp_path / "iter_10.pth", tmp_path / "adapters" / "iter_10"
    pth.write_bytes(b"first run")
    adapter.mkdir(parents=True)
    assert not converted(adapter, pth)  # no stamp: convert
    (adapter / SOURCE).write_text(json.dumps(_stamp(pth)))
    assert converted(adapter, pth)
    time.sleep(0.01)
    pth.write_bytes(b"second run, same name")
    assert not converted(adapter, pth)  # a rerun's checkpoint: convert again


# 3. the seeds' own files: a JSON array of XTuner conversations (indent=4, even named .jsonl)

def test_the_tutorials_generated_json_arrays_are_read(tmp_path):
    record = {"conversation": [{"system": "s", "input": "请做一下自我介绍", "output": "我是小明的小助手"}]}
    for name in ("personal_assistant.json", "from_xlsx.jsonl"):
        f = tmp_path / name
        f.write_text(json.dumps([record] * 10001, ensure_ascii=False, indent=4), encoding="utf-8")
        r = validate(f)
        assert (r.samples, r.turns) == (10001, 10001)
        where, msgs = next(samples(f))
        assert where == f"{f}: record 1" and msgs[0] == {"role": "system", "content": "s"}


def test_a_file_that_is_neither_says_what_it_is(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"data": [1, 2]}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match="one JSON object with keys data: expected JSONL or a JSON array"):
        validate(f)
    f.write_text('[{"conversation": [{"input": "q", "output": ""}]}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"record 1: messages\[1\].content: empty assistant turn"):
        validate(f)


# 4. the base config's own prompt template, unless one is asked for

def test_the_base_configs_template_is_kept(tmp_path):
    s = settings(tmp_path, base_config="internlm_chat_7b_qlora_oasst1_e3")
    assert template_of(s) == "internlm_chat"
    cfg = load_config(write_config(s, tmp_path / "cfg.py"))
    assert cfg.train_dataloader.dataset.template_map_fn.template.SUFFIX == "<eoa>"
    assert template_of(settings(tmp_path, base_config="internlm_chat_7b_qlora_oasst1_e3",
                                prompt_template="internlm2_chat")) == "internlm2_chat"


def test_a_template_the_model_is_not_served_with_is_warned_about(tmp_path, capsys):
    chatml = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml}))
    warn_template_mismatch(settings(tmp_path, prompt_template="internlm2_chat"))
    assert "[warning]" not in capsys.readouterr().out
    warn_template_mismatch(settings(tmp_path, prompt_template="internlm_chat"))
    assert "prompt template internlm_chat writes <|User|>" in capsys.readouterr().out


def test_a_copied_config_of_ones_own(tmp_path):
    from training.config import builtin_config

    mine = tmp_path / "my_config.py"
    mine.write_text(builtin_config("internlm2_chat_1_8b_qlora_alpaca_e3").read_text(encoding="utf-8"))
    cfg = load_config(write_config(settings(tmp_path, base_config=str(mine)), tmp_path / "cfg.py"))
    assert cfg.train_dataloader.dataset.dataset_map_fn.__name__ == "openai_map_fn"
    with pytest.raises(DataError, match="no such config file"):
        builtin_config(str(tmp_path / "missing.py"))


# 5. full fine-tuning: fp32 weights under fp16 AMP (fp16 weights cannot be unscaled)

def test_full_gpu_config_loads_fp32_weights(tmp_path):
    cfg = load_config(write_config(settings(tmp_path, method="full", profile="gpu"), tmp_path / "cfg.py"))
    assert "torch_dtype" not in cfg.model.llm and "lora" not in cfg.model
    assert cfg.optim_wrapper.type.__name__ == "AmpOptimWrapper"
    assert any(h.type.__name__ == "ThroughputHook" for h in cfg.custom_hooks)


# 6. selection: broken text and forgotten answers lose, and the table says why

def test_selection_prefers_whole_answers_close_to_the_base_model():
    base = "上海是中国的一个大城市，也是重要的经济中心。"
    assert general_quality("你好， +，t tr��手微调��手.", base, "小明") == 0.0
    assert general_quality("我是小明", base, "小明") == 0.0
    assert general_quality(base, base, "小明") == 1.0
    s = TrainSettings(evaluation_inputs=["你是谁"], general_questions=["介绍上海"], expected_answer="小明")
    broken = Score(20, 1, general_quality("上海是�大城", base, "小明"), {"你是谁": "我是小明"}, broken=1)
    clean = Score(40, 1, general_quality(base, base, "小明"), {"你是谁": "我是小明"})
    assert pick([broken, clean], s) is clean
    text = table([broken, clean], clean, s)
    assert "iter_40 won: 1/1 identity answers hold '小明', general answers 100% like the base model's" in text


# 7. what the run needs, checked first

def test_qlora_and_deepspeed_are_checked_before_anything_runs(tmp_path, monkeypatch):
    import torch

    with pytest.raises(DataError, match="profile gpu: no CUDA device here"):
        preflight(settings(tmp_path, method="qlora", profile="gpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed (as on a CPU machine)
    with pytest.raises(DataError, match="method qlora needs bitsandbytes with CUDA.*pip install bitsandbytes"):
        preflight(settings(tmp_path, method="qlora", profile="gpu"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "deepspeed" else object())
    with pytest.raises(DataError, match="DeepSpeed is not installed: pip install deepspeed"):
        preflight(settings(tmp_path, method="lora", profile="gpu", deepspeed="zero2"))
    with pytest.raises(DataError, match="gpus: 2 asked for, 1 here"):
        preflight(settings(tmp_path, method="lora", profile="gpu", gpus=2))


def test_missing_inputs_are_named_before_the_data_check(tmp_path):
    with pytest.raises(DataError, match=r"model_path: /nope/internlm2: no such folder"):
        preflight(settings(tmp_path, model_path="/nope/internlm2"))
    with pytest.raises(DataError, match="base_config: XTuner has no built-in config 'nonsense'"):
        preflight(settings(tmp_path, base_config="nonsense"))
    preflight(settings(tmp_path, model_path="internlm/internlm2-chat-1_8b"))  # a hub id is XTuner's to fetch


# 8. the smaller traps

def test_written_files_keep_readable_modes(tmp_path):
    f = tmp_path / "out.jsonl"
    write_jsonl(f, [{"a": 1}])
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~_umask()
    os.chmod(f, 0o640)
    write_jsonl(f, [{"a": 2}])  # replaced in place: its mode stays
    assert stat.S_IMODE(f.stat().st_mode) == 0o640


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_mix_ratio_is_what_comes_out(tmp_path):
    general = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
               for i in range(5)]
    from training.data.generate_self_cognition import asks_identity, generate

    rows = generate("小明", "助手", repeat=20, mix_rows=general, mix_ratio=0.3)
    share = sum(not asks_identity(r) for r in rows) / len(rows)
    assert abs(share - 0.3) < 0.01  # 5 general chats, repeated, make 30 % of ~570


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def test_validate_reports_every_file_and_needs_a_tokenizer_for_lengths(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    write_jsonl(good, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    bad.write_text("{oops\n", encoding="utf-8")
    r = run("-m", "training.data.validate", str(bad), str(good))
    assert r.returncode == 1 and f"{good}: 1 samples" in r.stdout and f"{bad}:1: invalid JSON" in r.stderr
    r = run("-m", "training.data.validate", str(good), "--max-length", "100")
    assert r.returncode == 1 and "--max-length needs --tokenizer" in r.stderr


def test_the_tutorials_replace_spelling_is_taken(tmp_path):
    f = tmp_path / "d.jsonl"
    write_jsonl(f, [{"messages": [{"role": "user", "content": "你是谁"}, {"role": "assistant", "content": "我是机智流"}]}])
    r = run("-m", "training.data.replace", str(f), str(f), "--old_text", "机智流", "--new_text", "小明")
    assert r.returncode == 0, r.stderr
    assert "小明" in f.read_text(encoding="utf-8")


def test_xtuner_train_exits_non_zero_on_an_error(tmp_path):
    xtuner = ROOT / ".venv-train" / "bin" / "xtuner"
    r = subprocess.run([str(xtuner), "train", str(tmp_path / "missing_config.py")], capture_output=True, text=True)
    assert r.returncode != 0  # XTuner's own command exits 0 here


def test_the_summary_reads_xtunders_log(tmp_path):
    log = tmp_path / "train.log"
    lines = [f"Iter(train) [{i:>3}/100]  lr: 1e-4  eta: 0:00:10  time: {t}  data_time: 0.01  memory: 9700  "
             f"loss: 0.5  tflops: 97.0000  tokens_per_sec: 3470.0" for i, t in ((10, 1.0), (20, 0.3), (30, 0.29))]
    log.write_text("\n".join(lines), encoding="utf-8")
    out = summary(log)
    assert "0.295 s/iter" in out and "3,470 tokens/s" in out and "peak memory 9.5 GB" in out and "estimate 97.0 TFLOPs" in out


def test_activation_checkpointing_auto_follows_the_gpus_memory(tmp_path):
    from training.config import use_checkpointing
    from training.settings import TrainSettings

    (tmp_path / "config.json").write_text(json.dumps({  # InternLM2-1.8B and -7B shapes
        "hidden_size": 2048, "num_hidden_layers": 24, "intermediate_size": 8192, "vocab_size": 92544}))
    s = TrainSettings(model_path=str(tmp_path), data_files=["x"], max_length=8192)
    assert use_checkpointing(s, gpu_gb=79.6) is False     # H100 80 GB: the measured 46 GB fits
    assert use_checkpointing(s, gpu_gb=24) is True         # a 24 GB card recomputes
    assert use_checkpointing(dataclasses.replace(s, activation_checkpointing="true"), gpu_gb=141) is True
    assert use_checkpointing(dataclasses.replace(s, profile="cpu"), gpu_gb=0) is True
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 92544}))
    assert use_checkpointing(s, gpu_gb=79.6) is True      # 7B at 8,192 tokens would not fit


def test_mfu_comes_from_the_parameter_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 2048, "num_hidden_layers": 24, "intermediate_size": 8192, "vocab_size": 92544,
        "num_attention_heads": 16, "num_key_value_heads": 8}))
    fpt = model_flops_per_token(tmp_path, 8192)
    assert 12.6e9 < fpt < 12.7e9  # 6 x 1.70 B matmul parameters + causal attention at 8,192
    log = tmp_path / "train.log"
    log.write_text("\n".join(f"Iter(train) [{i}/30]  time: 0.34  memory: 47100  tflops: 319.1  "
                             f"tokens_per_sec: 24146.0" for i in (5, 10, 15)), encoding="utf-8")
    out = summary(log, tmp_path, 8192)
    assert "model 304.5 TFLOPs" in out and "XTuner's hardware estimate 319.1 TFLOPs" in out
