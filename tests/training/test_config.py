"""Config rendering, checked by loading the rendered file with mmengine as XTuner does."""
from __future__ import annotations

import pytest

from training.config import load_config, render, write_config
from training.data.io import DataError
from training.settings import TrainSettings, load_settings


def settings(tmp_path, **kw) -> TrainSettings:
    base = dict(model_path="/models/internlm2-chat-1_8b", data_files=[str(tmp_path / "d.jsonl")],
                work_dir=str(tmp_path / "work"))
    return TrainSettings(**{**base, **kw}).validate()


def test_qlora_gpu_render_keeps_quantisation_and_uses_our_data(tmp_path):
    s = settings(tmp_path, evaluation_inputs=["你是谁"], system="你是小明", lr=1e-4, epochs=2,
                 max_length=1024, batch_size=2, accumulative_counts=8, save_steps=100)
    cfg = load_config(write_config(s, tmp_path / "cfg.py"))
    llm = cfg.model.llm
    assert llm.pretrained_model_name_or_path == cfg.tokenizer.pretrained_model_name_or_path == s.model_path
    assert llm.quantization_config.load_in_4bit is True
    ds = cfg.train_dataloader.dataset
    assert ds.dataset.path == "json" and ds.dataset.data_files == {"train": s.data_files}
    assert ds.dataset_map_fn.__name__ == "openai_map_fn" and ds.max_length == 1024
    assert ds.template_map_fn.template.SUFFIX == "<|im_end|>"
    assert cfg.optim_wrapper.type.__name__ == "AmpOptimWrapper" and cfg.optim_wrapper.optimizer.lr == 1e-4
    assert cfg.optim_wrapper.accumulative_counts == 8 and cfg.train_dataloader.batch_size == 2
    # save_steps counts optimizer updates: 100 of them are 800 batches at accumulation 8
    assert cfg.train_cfg.max_epochs == 2 and cfg.default_hooks.checkpoint.interval == 800
    hook = cfg.custom_hooks[1]
    assert hook.evaluation_inputs == ["你是谁"] and hook.system == "你是小明"


def test_cpu_lora_iteration_schedule(tmp_path):
    s = settings(tmp_path, method="lora", profile="cpu", max_steps=300, warmup_ratio=0.03, lora_r=8,
                 lora_alpha=16, save_total_limit=-1, accumulative_counts=1)
    cfg = load_config(write_config(s, tmp_path / "cfg.py"))
    assert "quantization_config" not in cfg.model.llm and str(cfg.model.llm.torch_dtype) == "torch.float32"
    assert cfg.model.lora.r == 8 and cfg.model.lora.lora_alpha == 16
    # PEFT's every-linear-but-the-head: XTuner's own default gives InternLM2's `output` a LoRA
    assert cfg.model.lora.target_modules == "all-linear"
    assert cfg.optim_wrapper.type.__name__ == "OptimWrapper"
    assert "loss_scale" not in cfg.optim_wrapper and "dtype" not in cfg.optim_wrapper
    assert cfg.train_cfg.max_iters == 300
    warm, cosine = cfg.param_scheduler
    assert (warm.by_epoch, warm.begin, warm.end) == (False, 0, 9)
    assert (cosine.by_epoch, cosine.begin, cosine.end) == (False, 9, 300)
    assert cfg.default_hooks.checkpoint.max_keep_ckpts == -1


def test_full_finetune_and_another_builtin(tmp_path):
    s = settings(tmp_path, base_config="internlm2_5_chat_7b_qlora_alpaca_e3", method="full")
    cfg = load_config(write_config(s, tmp_path / "cfg.py"))
    assert "lora" not in cfg.model and "quantization_config" not in cfg.model.llm
    text = render(s)
    assert text.startswith("# Rendered from XTuner's internlm2_5_chat_7b_qlora_alpaca_e3")


def test_unknown_builtin_suggests_names(tmp_path):
    with pytest.raises(DataError, match="did you mean internlm2_chat_1_8b_qlora_alpaca_e3"):
        render(settings(tmp_path, base_config="internlm2_chat_1_8b_qlora_alpaca_e"))


def test_settings_file_errors(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("model_path: m\ndata_files: [d.jsonl]\nlearning_rate: 1\n", encoding="utf-8")
    with pytest.raises(DataError, match="t.yaml: unknown setting 'learning_rate'"):
        load_settings(y)
    y.write_text("model_path: m\ndata_files: [d.jsonl\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.yaml:\d+: invalid YAML"):
        load_settings(y)
    with pytest.raises(DataError, match="batch_size: expected int"):
        load_settings(None, ["model_path=m", "data_files=[d]", "batch_size=big"])
    with pytest.raises(DataError, match="profile cpu: QLoRA"):
        load_settings(None, ["model_path=m", "data_files=[d]", "profile=cpu"])
    s = load_settings(None, ["model_path=m", "data_files=a.jsonl,b.jsonl", "max_steps=5",
                             "evaluation_inputs=Hi, who are you?"])
    assert s.data_files == ["a.jsonl", "b.jsonl"] and s.max_steps == 5
    assert s.evaluation_inputs == ["Hi, who are you?"]  # one question, not two
    s = load_settings(None, ["model_path=m", "data_files=[d]", "evaluation_inputs=[你是谁, 'Hi, who are you?']"])
    assert s.evaluation_inputs == ["你是谁", "Hi, who are you?"]


def test_a_broken_render_leaves_no_file(tmp_path, monkeypatch):
    import training.config as c
    monkeypatch.setattr(c, "render_config", lambda s: ("this is not python(", []))
    with pytest.raises(DataError, match="does not load"):
        write_config(settings(tmp_path), tmp_path / "cfg.py")
    assert list(tmp_path.iterdir()) == []


def test_max_steps_counts_optimizer_updates(tmp_path):
    """20 steps at accumulation 16 were 20 batches (one update and a bit); they are 20 updates."""
    cfg = load_config(write_config(settings(tmp_path, max_steps=20, accumulative_counts=16, save_steps=5),
                                   tmp_path / "cfg.py"))
    assert cfg.train_cfg.max_iters == 320 and cfg.default_hooks.checkpoint.interval == 80
    assert cfg.param_scheduler[1].end == 320
