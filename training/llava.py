"""LLaVA with XTuner, as the tutorials' second part does it, from one settings file:

    python -m training.llava --config training/examples/llava_tiny_cpu.yaml [--set key=value]

1. pretrain: XTuner's built-in LLaVA pretrain config, edited for the LLM, the visual encoder
   and the data; only the projector learns (skipped when `pretrained_pth` is given).
2. finetune: the built-in finetune config with `pretrained_pth` = the projector of step 1, LoRA
   (or QLoRA) on the LLM.
3. convert: XTuner's `pth_to_hf` (its own LLaVA layout: llm_adapter/, projector/), then to the
   Hugging Face llava layout (LlavaForConditionalGeneration + LlavaProcessor: the adapter
   merged into the LLM, the projector, the vision tower) that the serving side's transformers
   backend loads.

Each stage's config is written atomically and loaded back by mmengine before XTuner runs it;
every data record and image is checked first (training.data.llava).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import _Source, builtin_config, describe_changes, load_config
from .data.io import DataError, atomic_dir, atomic_path, run_cli
from .data.llava import load as load_llava_data
from .run import StepFailed, Stopped, _tool, checkpoints, run_step, stoppable
from .settings import load_settings as _load_settings

IMAGE_TOKEN = "<image>"


@dataclass
class LlavaSettings:
    llm_path: str = ""
    visual_encoder_path: str = ""
    data_path: str = ""
    image_folder: str = ""
    pretrain_data_path: str = ""        # default: data_path
    pretrained_pth: str = ""            # a pretrain checkpoint: skip the pretrain stage
    pretrain_config: str = "llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain"
    finetune_config: str = "llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune"
    prompt_template: str = ""           # empty: the base config's own
    method: str = "qlora"               # qlora | lora (LLM adapter; the vision tower stays frozen)
    lora_r: int = 512
    lora_alpha: int = 256
    max_length: int = 1472
    batch_size: int = 16
    pretrain_steps: int = 0             # 0: one epoch
    finetune_steps: int = 0
    pretrain_lr: float = 1e-3
    finetune_lr: float = 2e-4
    evaluation_image: str = ""
    evaluation_inputs: list[str] = field(default_factory=lambda: ["Please describe this picture"])
    profile: str = "gpu"                # gpu | cpu (fp32, plain optimizer)
    seed: int = 0
    work_dir: str = "work_dirs/llava"
    # the keys the user gave (settings file or --set); None: all (settings made in code)
    given: frozenset | None = field(default=None, repr=False, compare=False, metadata={"internal": True})

    def gave(self, name: str) -> bool:
        return self.given is None or name in self.given

    def validate(self) -> "LlavaSettings":
        for name in ("llm_path", "visual_encoder_path", "data_path", "image_folder"):
            if not getattr(self, name):
                raise DataError(f"{name}: required")
        if self.method not in ("qlora", "lora"):
            raise DataError(f"method: must be qlora or lora, got {self.method!r}")
        if self.profile not in ("gpu", "cpu"):
            raise DataError(f"profile: must be gpu or cpu, got {self.profile!r}")
        if self.profile == "cpu" and self.method == "qlora":
            raise DataError("profile cpu: QLoRA needs CUDA (use method: lora)")
        for name in ("batch_size", "max_length", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                raise DataError(f"{name}: must be >= 1, got {getattr(self, name)}")
        return self


def load_settings(path: str | None, overrides: list[str]) -> LlavaSettings:
    return _load_settings(path, overrides, LlavaSettings)


def render(s: LlavaSettings, stage: str, pretrained_pth: str = "", changes: list | None = None) -> str:
    """The stage's config; a config of the user's own (a path) keeps its values but for the
    settings the user gave and the paths of the models and data. What changed from the base
    config is appended to `changes` when given."""
    base = s.pretrain_config if stage == "pretrain" else s.finetune_config
    src = _Source(builtin_config(base).read_text(encoding="utf-8"))
    steps = s.pretrain_steps if stage == "pretrain" else s.finetune_steps
    data = (s.pretrain_data_path or s.data_path) if stage == "pretrain" else s.data_path
    own = base.endswith(".py")
    lr_key = "pretrain_lr" if stage == "pretrain" else "finetune_lr"
    setting_of = {"max_length": "max_length", "batch_size": "batch_size", "lr": lr_key,
                  "evaluation_inputs": "evaluation_inputs", "randomness": "seed",
                  "evaluation_images": "evaluation_image"}

    def take(var: str) -> bool:
        return not own or var not in setting_of or s.gave(setting_of[var])
    literal = {
        "llm_name_or_path": repr(str(Path(s.llm_path).resolve()) if Path(s.llm_path).exists() else s.llm_path),
        "visual_encoder_name_or_path": repr(str(Path(s.visual_encoder_path).resolve())
                                            if Path(s.visual_encoder_path).exists() else s.visual_encoder_path),
        "data_path": repr(str(Path(data).resolve())), "image_folder": repr(str(Path(s.image_folder).resolve())),
        "max_length": repr(s.max_length), "batch_size": repr(s.batch_size),
        "lr": repr(s.pretrain_lr if stage == "pretrain" else s.finetune_lr),
        "evaluation_inputs": repr(list(s.evaluation_inputs)),
        "randomness": f"dict(seed={s.seed!r}, deterministic=False)",
    }
    # no evaluation image: the hook asks in words only (the built-in's default is a URL it
    # would download at the start of training)
    literal["evaluation_images"] = repr(str(Path(s.evaluation_image).resolve())) if s.evaluation_image else "None"
    if s.prompt_template:
        literal["prompt_template"] = f"PROMPT_TEMPLATE.{s.prompt_template}"
    if steps:
        literal["save_steps"] = repr(steps)
    for var, code in literal.items():
        if src.has(var) and take(var):
            src.set_var(var, code)
    if stage == "finetune":
        if not src.has("pretrained_pth"):
            raise DataError(f"{base}: not a LLaVA finetune config (no pretrained_pth)")
        src.set_var("pretrained_pth", repr(str(Path(pretrained_pth).resolve())))
        src.del_kw("model", ["visual_encoder_lora"])  # the vision tower stays as it is
        if src._keyword("model", ["llm_lora"]) is not None:
            if not own or s.gave("lora_r"):
                src.set_kw("model", ["llm_lora", "r"], repr(s.lora_r))
            if not own or s.gave("lora_alpha"):
                src.set_kw("model", ["llm_lora", "lora_alpha"], repr(s.lora_alpha))
    if (s.method == "lora" and (not own or s.gave("method"))) or s.profile == "cpu":
        src.del_kw("model", ["llm", "quantization_config"])
    if s.profile == "cpu":
        src.set_kw("model", ["llm", "torch_dtype"], "torch.float32")
        src.set_kw("optim_wrapper", ["type"], "OptimWrapper")
        src.del_kw("optim_wrapper", ["loss_scale"])
        src.del_kw("optim_wrapper", ["dtype"])
        src.add_import("from mmengine.optim import OptimWrapper")
        src.set_var("dataloader_num_workers", "0")
        src.set_kw("train_dataloader", ["pin_memory"], "False")
    if steps:
        warm = max(2, round(0.03 * steps))
        src.set_var("train_cfg", f"dict(type=TrainLoop, max_iters={steps})")
        src.set_var("param_scheduler", (
            f"[\n    dict(type=LinearLR, start_factor=1e-2, by_epoch=False, begin=0, end={warm}),\n"
            f"    dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=False, begin={warm}, end={steps}),\n]"))
        src.set_var("evaluation_freq", repr(10 * steps))
        if src._keyword("default_hooks", ["logger", "interval"]) is not None:
            src.set_kw("default_hooks", ["logger", "interval"], repr(max(1, min(10, steps // 10))))
    if changes is not None:
        changes += src.changes
    return f"# Rendered from XTuner's {base} by training/llava.py ({stage})\n" + src.text


def write_config(s: LlavaSettings, stage: str, out: Path, pretrained_pth: str = "") -> Path:
    changes: list = []
    text = render(s, stage, pretrained_pth, changes)
    print(describe_changes(changes, s.pretrain_config if stage == "pretrain" else s.finetune_config), flush=True)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
        load_config(tmp)
    return out


def _train(config: Path, work: Path, s: LlavaSettings) -> Path:
    shutil.rmtree(work, ignore_errors=True)  # a stage always starts clean
    run_step("train", _tool("train", str(config), "--work-dir", str(work), "--seed", str(s.seed)),
             work.parent / f"{work.name}.log", local_model=Path(s.llm_path).exists())
    found = checkpoints(work)
    if not found:
        raise StepFailed(f"train wrote no checkpoint in {work}")
    return found[-1][1]


def to_llava_hf(s: LlavaSettings, xtuner_dir: Path, out: Path) -> Path:
    """XTuner's LLaVA layout (llm_adapter/, projector/) -> Hugging Face llava (what
    LlavaForConditionalGeneration and LlavaProcessor read), the adapter merged."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = AutoTokenizer.from_pretrained(s.llm_path, trust_remote_code=True)
    llm = AutoModelForCausalLM.from_pretrained(s.llm_path, torch_dtype=torch.float32, trust_remote_code=True)
    if (xtuner_dir / "llm_adapter").is_dir():
        llm = PeftModel.from_pretrained(llm, str(xtuner_dir / "llm_adapter")).merge_and_unload()
    vision = CLIPVisionModel.from_pretrained(s.visual_encoder_path, torch_dtype=torch.float32)
    proj_files = sorted((xtuner_dir / "projector").glob("*.safetensors"))
    proj = load_file(str(proj_files[0])) if proj_files else torch.load(
        next((xtuner_dir / "projector").glob("*.bin")), map_location="cpu", weights_only=True)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    llm.resize_token_embeddings(len(tokenizer))
    v = vision.config
    config = LlavaConfig(vision_config=v.to_dict(), text_config=llm.config.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=(v.image_size // v.patch_size) ** 2)
    config.text_config.architectures = llm.config.architectures
    model = LlavaForConditionalGeneration(config).eval()
    state = {f"language_model.{k}": t for k, t in llm.state_dict().items()}
    state |= {f"vision_tower.{k}": t for k, t in vision.state_dict().items()}
    names = {"model.0.weight": "linear_1.weight", "model.0.bias": "linear_1.bias",
             "model.2.weight": "linear_2.weight", "model.2.bias": "linear_2.bias"}
    state |= {f"multi_modal_projector.{names[k]}": t for k, t in proj.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise StepFailed(f"to_llava_hf: weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.generation_config = llm.generation_config
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(s.visual_encoder_path), tokenizer=tokenizer,
        patch_size=v.patch_size, vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1, chat_template=getattr(tokenizer, "chat_template", None))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        _portable_tokenizer_config(tmp)
    return out


def finetune_summary(s: LlavaSettings, records: list[dict], log: Path) -> str:
    """XTuner's s/iter and peak memory for the finetune stage, with tokens/s per GPU from the
    data (XTuner's LLaVA configs log no token count): batch_size x the mean sample length, an
    image's patch tokens plus the tokenized text of its turns (capped at max_length)."""
    from transformers import AutoTokenizer

    from .pipeline import summary

    line = summary(log)
    m = re.search(r"([\d.]+) s/iter", line)
    if not m or "tokens/s" in line:  # nothing to divide by, or XTuner counted the tokens itself
        return line
    try:
        v = json.loads((Path(s.visual_encoder_path) / "config.json").read_text(encoding="utf-8"))
        v = v.get("vision_config", v)
        image_tokens = (v["image_size"] // v["patch_size"]) ** 2
        tok = AutoTokenizer.from_pretrained(s.llm_path, trust_remote_code=True)
    except (OSError, KeyError, ValueError):
        return line
    sample = records[: min(len(records), 256)]
    lengths = [min(s.max_length, image_tokens + sum(len(tok(t["value"]).input_ids) for t in r["conversations"]))
               for r in sample]
    per_sample = sum(lengths) / max(1, len(lengths))
    tps = s.batch_size * per_sample / float(m.group(1))
    per = "GPU" if "peak memory" in line else "process"
    return line + f", {tps:,.0f} tokens/s/{per} ({s.batch_size} x {per_sample:.0f} tokens per sample, " \
                  f"{image_tokens} of them the image's)"


def _portable_tokenizer_config(folder: Path) -> None:
    """The chat template in tokenizer_config.json too, where every transformers version reads it."""
    cfg_path = folder / "tokenizer_config.json"
    template = folder / "chat_template.jinja"
    if cfg_path.exists() and template.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg.setdefault("chat_template", template.read_text(encoding="utf-8"))
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def run(s: LlavaSettings, out: str | Path | None = None) -> Path:
    work = Path(s.work_dir)
    out = Path(out) if out else work / "merged"
    records = load_llava_data(s.data_path, s.image_folder)
    print(f"[data] {s.data_path}: {len(records)} records, images checked", flush=True)
    if s.pretrain_data_path:
        load_llava_data(s.pretrain_data_path, s.image_folder)
    work.mkdir(parents=True, exist_ok=True)
    projector = s.pretrained_pth
    if not projector:
        cfg = write_config(s, "pretrain", work / "pretrain_config.py")
        print(f"[pretrain] {cfg}", flush=True)
        projector = str(_train(cfg, work / "pretrain", s))
    cfg = write_config(s, "finetune", work / "finetune_config.py", projector)
    print(f"[finetune] {cfg} (projector {projector})", flush=True)
    pth = _train(cfg, work / "finetune", s)
    print(finetune_summary(s, records, work / "finetune.log"), flush=True)
    xtuner_dir = work / "xtuner_llava"
    with atomic_dir(xtuner_dir) as tmp:
        run_step("convert", _tool("pth_to_hf", str(cfg), str(pth), str(tmp), "--fp32", "--safe-serialization"),
                 work / "convert.log")
    to_llava_hf(s, xtuner_dir, out)
    print(f"[done] LLaVA model (Hugging Face layout): {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML settings file (see LlavaSettings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="the LLaVA model folder (default: WORK_DIR/merged)")
    a = p.parse_args(argv)

    def work() -> None:
        run(load_settings(a.config, a.set), a.out)
    try:
        with stoppable():
            return run_cli(work, errors=(StepFailed,))
    except Stopped as stop:
        where = f" at {stop.where}" if stop.where else ""
        print(f"[stopped] {stop}: {stop.step or 'the run'} stopped{where}, its processes with it",
              file=sys.stderr, flush=True)
        return 128 + stop.signum

if __name__ == "__main__":
    sys.exit(main())
