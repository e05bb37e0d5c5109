"""The tutorial's LLaVA configs rendered from one settings file (GPU profile: QLoRA kept),
loaded back by mmengine as XTuner will."""
from __future__ import annotations

import pytest

from training.config import load_config
from training.data.io import DataError
from training.llava import LlavaSettings, load_settings, write_config


def settings(tmp_path, **kw):
    return LlavaSettings(llm_path="/root/models/internlm2-chat-1_8b", visual_encoder_path="/root/models/clip-vit-large-patch14-336",
                         data_path=str(tmp_path / "repeated_data.json"), image_folder=str(tmp_path / "images"),
                         evaluation_inputs=["Please describe this picture", "请描述一下这张照片"], **kw).validate()


def test_both_stages_render_and_load_for_the_gpu(tmp_path):
    s = settings(tmp_path, batch_size=1, finetune_steps=300)
    pre = load_config(write_config(s, "pretrain", tmp_path / "pre.py"))
    assert pre.llm_name_or_path == s.llm_path and pre.visual_encoder_name_or_path == s.visual_encoder_path
    assert pre.model.freeze_llm is True and pre.data_path == s.data_path
    ft = load_config(write_config(s, "finetune", tmp_path / "ft.py", tmp_path / "pre/iter_2181.pth"))
    assert ft.pretrained_pth.endswith("pre/iter_2181.pth") and ft.batch_size == 1
    assert "quantization_config" in ft.model.llm and "visual_encoder_lora" not in ft.model  # QLoRA on the LLM only
    assert ft.evaluation_inputs == ["Please describe this picture", "请描述一下这张照片"]
    assert ft.train_cfg.max_iters == 300


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="llm_path: required"):
        LlavaSettings(visual_encoder_path="v", data_path="d", image_folder="i").validate()
    with pytest.raises(DataError, match="QLoRA needs CUDA"):
        settings(tmp_path, profile="cpu")
    with pytest.raises(DataError, match="unknown setting 'llm'"):
        load_settings(None, ["llm=x"])


def test_without_an_evaluation_image_nothing_is_downloaded(tmp_path):
    """The built-in configs' evaluation image is a URL; with none set, the hook asks in words."""
    cfg = load_config(write_config(settings(tmp_path), "finetune", tmp_path / "ft.py", tmp_path / "p.pth"))
    assert cfg.evaluation_images is None
    hook = next(h for h in cfg.custom_hooks if "evaluation_inputs" in h)
    assert hook["evaluation_images"] is None
    cfg = load_config(write_config(settings(tmp_path, evaluation_image=str(tmp_path / "oph.jpg")), "finetune",
                                   tmp_path / "ft2.py", tmp_path / "p.pth"))
    assert cfg.evaluation_images == str(tmp_path / "oph.jpg")


def test_a_copied_llava_config_keeps_its_batch_size_and_questions(tmp_path, capsys):
    """A tutorial's edited copy (batch_size 1, its own two questions) as finetune_config, with only
    the required keys: batch_size became 16 and two questions became one. They stay now, and what
    changed is listed."""
    from training.config import builtin_config

    name = "llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune"
    text = builtin_config(name).read_text(encoding="utf-8").replace("batch_size = 16  # per_device", "batch_size = 1")
    mine = tmp_path / f"{name}_copy.py"
    mine.write_text(text, encoding="utf-8")
    yaml = tmp_path / "llava.yaml"
    yaml.write_text(f"llm_path: /m/llm\nvisual_encoder_path: /m/clip\ndata_path: {tmp_path / 'd.json'}\n"
                    f"image_folder: {tmp_path}\nfinetune_config: {mine}\n", encoding="utf-8")
    s = load_settings(str(yaml), [])
    cfg = load_config(write_config(s, "finetune", tmp_path / "ft.py", tmp_path / "p.pth"))
    assert cfg.batch_size == 1 and cfg.train_dataloader.batch_size == 1
    assert cfg.evaluation_inputs == ["请描述一下这张照片", "Please describe this picture"]
    listed = capsys.readouterr().out
    assert f"[config] changed from {mine.name}:" in listed and "llm_name_or_path:" in listed
    assert "batch_size:" not in listed
    s = load_settings(str(yaml), ["batch_size=4"])
    assert load_config(write_config(s, "finetune", tmp_path / "ft.py", tmp_path / "p.pth")).batch_size == 4
