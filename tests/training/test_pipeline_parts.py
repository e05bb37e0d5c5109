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
    with pytest.raises(DataError, match=r"record 1: conversation\[0\].output: empty"):
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


def test_missing_inputs_are_named_before_the_data_check(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"model_path: /nope/internlm2: no such folder"):
        preflight(settings(tmp_path, model_path="/nope/internlm2"))
    with pytest.raises(DataError, match="base_config: XTuner has no built-in config 'nonsense'"):
        preflight(settings(tmp_path, base_config="nonsense"))
    monkeypatch.setattr("training.pipeline.hub_reachable", lambda: "")  # the hub answers: XTuner fetches it
    assert preflight(settings(tmp_path, model_path="internlm/internlm2-chat-1_8b")).model_path == \
        "internlm/internlm2-chat-1_8b"
    assert preflight(settings(tmp_path, model_path="hf://internlm/internlm2-chat-1_8b")).model_path == \
        "internlm/internlm2-chat-1_8b"


def test_a_mistyped_path_shaped_like_a_hub_id_is_not_sent_to_an_unreachable_hub(tmp_path, monkeypatch):
    """ft/modle (a typo of a folder) went to the hub: 49 s and ~20 retry lines offline. Now the
    hub is asked only if it answers, and the error gives both readings."""
    from training.pipeline import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub_reachable()  # refused at once
    with pytest.raises(DataError, match=r"model_path: ft/modle: no such folder here; read as a Hugging Face hub "
                                        r"id the hub is not reachable .*hf://ft/modle or modelscope://ft/modle"):
        preflight(settings(tmp_path, model_path="ft/modle"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() == "HF_HUB_OFFLINE is set"


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_llava_config_as_base_config_says_to_use_training_llava(tmp_path):
    with pytest.raises(DataError, match="is a LLaVA \\(image\\) config: run python -m training.llava"):
        preflight(settings(tmp_path, base_config="llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune"))


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


# issue 20: never ship a model that learned nothing, honour the user's config, stop when told

def test_checkpoints_before_the_first_update_are_no_candidates_and_a_run_that_learned_nothing_says_so(tmp_path):
    from training.select import judge

    s = settings(tmp_path, expected_answer="小明", accumulative_counts=16)
    v = judge([], None, s, [10], 16, (2.1, 2.0))
    assert v.kind == "did not learn" and "iter_10" in v.reason and "first optimizer update (iteration 16" in v.reason
    nothing = [Score(20, 0, 1.5, {"你是谁": "我是一个助手"}), Score(40, 0, 1.4, {"你是谁": "我是助手"})]
    v = judge(nothing, pick(nothing, s), s, [], 16, (2.1, 2.0))
    assert not v.learned and "no checkpoint's answers hold '小明'" in v.reason
    broken = [Score(20, 2, 1.0, {"你是谁": "我是小明\ufffd"}, broken=2)]
    assert judge(broken, broken[0], s, [], 16, (2.1, 0.5)).kind == "broken answers"  # an identity answer broken
    assert judge(broken, broken[0], s, [], 16, (2.1, 0.5), base_broken=2).learned  # broken before training too
    one = [Score(20, 2, 1.8, {"你是谁": "我是小明", "请介绍一下你自己": "小明"}, broken=1)]
    v = judge(one, one[0], s, [], 16, (2.1, 0.5))
    assert v.learned and "1 of 6 answers with broken characters (the base model 0)" in v.reason
    most = [Score(20, 2, 0.0, {"你是谁": "我是小明", "请介绍一下你自己": "小明"}, broken=4)]
    assert judge(most, most[0], s, [], 16, (2.1, 0.5)).kind == "broken answers"  # most of them: fallen apart
    good = [Score(20, 2, 1.8, {"你是谁": "我是小明"})]
    v = judge(good, good[0], s, [], 16, (2.1, 0.3))
    assert v.learned and v.line().startswith("[verdict] learned: iter_20: 2/2 identity answers hold '小明'")
    no_key = settings(tmp_path, expected_answer="")
    assert judge(good, good[0], no_key, [], 1, (2.1, 2.05)).kind == "did not learn"  # the loss did not fall
    assert judge(good, good[0], no_key, [], 1, (2.1, 0.4)).learned


def test_ties_go_to_whole_answers_close_to_the_training_data_not_the_earliest(tmp_path):
    from training.select import identity_quality

    s = settings(tmp_path, expected_answer="小明", evaluation_inputs=["你是谁"])
    targets = ["我的名字是小明，由你亲手微调出来的AI助手。"]
    early = Score(30, 1, 1.0, {"你是谁": "我的小明，由"}, identity_quality=identity_quality("我的小明，由", "小明", targets))
    late = Score(40, 1, 1.0, {"你是谁": targets[0]}, identity_quality=identity_quality(targets[0], "小明", targets))
    assert pick([early, late], s) is late
    broken_early = Score(10, 1, 1.0, {"你是谁": "小明"}, broken=2)
    clean_late = Score(20, 1, 1.0, {"你是谁": "小明"}, broken=1)
    assert pick([broken_early, clean_late], s) is clean_late  # a tie: fewer broken answers first
    assert identity_quality("我是小明\ufffd", "小明", targets) == 0.0


def test_a_rerun_moves_the_merged_model_and_out_aside_and_checks_the_data_first(tmp_path):
    from training.pipeline import run

    work, out = tmp_path / "work", tmp_path / "elsewhere" / "model"
    for p in (work / "merged", out):
        p.mkdir(parents=True)
        (p / "config.json").write_text("{}")
    (work / "iter_10.pth").write_text("old")
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(json.dumps({"messages": [{"role": "user", "content": "你好"}, {"role": "assistant",
                                             "content": "小红"}]}, ensure_ascii=False).encode("gbk"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        run(settings(tmp_path, data_files=[str(gbk)]), out)
    assert (work / "iter_10.pth").exists() and (work / "merged").exists() and not (work / "previous").exists()
    prepare_work_dir(work, resume=False, out=out)
    assert not (work / "merged").exists() and not out.exists()
    (moved,) = (work / "previous").iterdir()
    assert sorted(p.name for p in moved.iterdir()) == ["iter_10.pth", "merged", "model"]


def test_a_copied_config_keeps_its_values_unless_a_key_is_given_and_every_change_is_listed(tmp_path):
    from training.config import builtin_config, describe_changes, render_config
    from training.settings import load_settings

    text = builtin_config("internlm2_chat_1_8b_qlora_alpaca_e3").read_text(encoding="utf-8")
    for old, new in (("max_length = 2048", "max_length = 1024"), ("max_epochs = 3", "max_epochs = 2"),
                     ("save_steps = 500", "save_steps = 300"), ("save_total_limit = 2", "save_total_limit = 3"),
                     ("evaluation_freq = 500", "evaluation_freq = 300")):
        assert old in text
        text = text.replace(old, new)
    mine = tmp_path / "internlm2_chat_1_8b_qlora_alpaca_e3_copy.py"
    mine.write_text(text, encoding="utf-8")
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    yaml = tmp_path / "run.yaml"
    yaml.write_text(f"base_config: {mine}\nmodel_path: {tmp_path}\ndata_files: [{data}]\n", encoding="utf-8")
    s = load_settings(yaml, [])
    cfg_text, changes = render_config(s)
    out = tmp_path / "cfg.py"
    out.write_text(cfg_text, encoding="utf-8")
    cfg = load_config(out)
    assert cfg.max_length == 1024 and cfg.train_cfg.max_epochs == 2 and cfg.default_hooks.checkpoint.interval == 300
    assert cfg.default_hooks.checkpoint.max_keep_ckpts == 3 and cfg.evaluation_freq == 300
    assert cfg.evaluation_inputs == ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
    names = [n for n, _, _ in changes]
    assert "pretrained_model_name_or_path" in names and "max_length" not in names and "max_epochs" not in names
    listing = describe_changes(changes, s.base_config)
    assert listing.startswith(f"[config] changed from {mine.name}:") and "pretrained_model_name_or_path:" in listing
    # a key given in the settings does change it, and says so
    s = load_settings(yaml, ["max_length=2048", "save_steps=10"])
    _, changes = render_config(s)
    assert ("max_length", "1024", "2048") in changes and ("save_steps", "300", "160") in changes  # 10 x 16


def test_the_summary_times_training_alone_and_has_no_tflops_on_a_cpu(tmp_path):
    """797/289/293/894 tokens/s with evaluation and saving in the two middle intervals: 492 was
    reported; training alone is ~846. A CPU run logs no memory: no TFLOPs figures."""
    log = tmp_path / "train.log"
    rows = [(10, 900.0, 5.8), (20, 797.0, 3.0), (30, 289.0, 2.0), (40, 293.0, 1.0), (50, 894.0, 0.5)]
    log.write_text("\n".join(f"Iter(train) [{i:>3}/50]  time: 0.5  loss: {loss}  tflops: 0.0001  "
                             f"tokens_per_sec: {t}" for i, t, loss in rows), encoding="utf-8")
    out = summary(log, save_every=30, eval_every=40)
    assert "loss 5.8 -> 0.5 over 50 iterations" in out and "846 tokens/s/process" in out
    assert "TFLOPs" not in out


def test_validate_says_when_records_are_mostly_duplicates(tmp_path):
    f = tmp_path / "personal_assistant.json"
    one = {"conversation": [{"input": "请做一下自我介绍", "output": "我是小红的小助手"}]}
    f.write_text(json.dumps([one] * 2001, ensure_ascii=False), encoding="utf-8")
    r = validate(f)
    assert r.duplicates_note() == "mostly duplicates: 2,001 records, 1 distinct (each repeated ~2,001x)"
    out = subprocess.run([sys.executable, "-m", "training.data.validate", str(f)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "note: mostly duplicates" in out.stdout


STOP_DRIVER = r'''
import sys, time
import training.pipeline as p
from training.run import run_step

def fake_run(s, out=None, resume=False, allow_unlearned=False):
    trainer = ("import subprocess, sys, time\n"
               "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
               "open(sys.argv[1], 'w').write(str(child.pid))\n"
               "for i in range(1, 1000):\n"
               "    print(f'Iter(train) [{i}/1000]  loss: 1.0', flush=True); time.sleep(0.05)\n")
    run_step("train", [sys.executable, "-c", trainer, sys.argv[1]], p.Path(s.work_dir) / "train.log")
p.run = fake_run
sys.exit(p.main(sys.argv[2:]))
'''


def test_sigterm_stops_the_whole_training_tree_and_says_so(tmp_path):
    import signal

    s = settings(tmp_path)
    pidfile = tmp_path / "grandchild.pid"
    proc = subprocess.Popen([sys.executable, "-c", STOP_DRIVER, str(pidfile), "--set", f"model_path={s.model_path}",
                             "--set", f"data_files={s.data_files[0]}", "--set", f"work_dir={s.work_dir}",
                             "--set", "profile=cpu", "--set", "method=lora"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((tmp_path / "work" / "train.log").exists() and "[5/1000]" in
               (tmp_path / "work" / "train.log").read_text()) and time.time() < deadline:
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (out, err)
    assert "[stopped] SIGTERM: train stopped at iteration" in err and "its processes with it" in err
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{grandchild}") and time.time() < deadline:
        if "Z" in open(f"/proc/{grandchild}/stat").read().rsplit(")", 1)[1].split()[0]:
            break
        time.sleep(0.05)
    alive = os.path.exists(f"/proc/{grandchild}") and \
        "Z" not in open(f"/proc/{grandchild}/stat").read().rsplit(")", 1)[1].split()[0]
    assert not alive  # the trainer's own child went too: nothing left writing checkpoints


def test_the_training_commands_run_from_any_folder(tmp_path):
    for tool in ("chat-train", "chat-llava"):
        r = subprocess.run([str(ROOT / ".venv-train" / "bin" / tool), "--help"], cwd=tmp_path, capture_output=True,
                           text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-500:]
