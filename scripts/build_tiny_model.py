"""Build a tiny offline chat model with random weights and a byte-level BPE tokenizer trained
here with `tokenizers`, carrying InternLM2's special tokens and its chat template. Nothing is
downloaded; it takes a few seconds on a CPU. Two architectures, the families our users run:

- `--arch qwen2` (default for the tiny model): transformers' own Qwen2 classes.
- `--arch internlm2`: laid out as the InternLM2 hub repos are (internlm2-chat-1_8b,
  internlm2_5-7b-chat): `model_type internlm2`, packed `wqkv` weights under InternLM2's names,
  `auto_map` naming InternLM2's own modeling and configuration files, copied at build time from
  the installed XTuner (`xtuner/_lite/modelings/internlm2/`: the training environment's, or
  --internlm2-code DIR), its special tokens with `</s>` as EOS and `<|im_end|>` ending a turn
  (generation_config), the `internlm2_chat` format.

With --shape it builds a random-weight model of a real size instead (for benchmarks and GPU
runs: speed does not depend on weight values); the tokenizer's vocabulary is padded to the
shape's so every id the model can emit decodes. internlm2-* shapes are InternLM2 models unless
--arch qwen2 asks for the Qwen2 architecture at InternLM2's sizes.

Self-contained on purpose: it runs in the serving environment (transformers 5) and in the
training environment (transformers 4.48), so it imports neither side's package.

    python scripts/build_tiny_model.py --out models/tiny-chat
    python scripts/build_tiny_model.py --arch internlm2 --hidden 128 --out models/tiny-internlm2
    python scripts/build_tiny_model.py --shape internlm2-1.8b --device cuda --out /tmp/internlm2-1.8b
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("qwen2", "internlm2")

# InternLM2's special tokens; `<|im_end|>` ends an assistant turn.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|action_start|>",
                  "<|action_end|>", "<|interpreter|>", "<|plugin|>"]

# InternLM2-chat's own template (what `internlm2_chat` in XTuner renders), BOS included.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# A small mixed English/Chinese corpus so common words and characters get their own tokens.
CORPUS = """
Hello! How can I help you today? I am an AI assistant. I can answer questions, write text,
translate, summarise documents and help with code. What is your name? Who are you?
Please introduce yourself. The weather is nice today. Let us learn about machine learning,
large language models, fine-tuning, LoRA adapters, datasets and evaluation.
The quick brown fox jumps over the lazy dog. Python is a programming language.
你好！我是一个人工智能助手，可以回答问题、写作、翻译和编程。你是谁？请介绍一下你自己。
今天天气很好。我们来学习机器学习、大语言模型、微调、数据集和评测。谢谢你的帮助。
中国的首都是北京。上海是一个大城市。请用中文回答。我很高兴为你服务。
""".strip()


# Real model sizes (internlm2-*: InternLM2's own config values, as the hub repos have them).
SHAPES: dict[str, dict] = {
    "qwen2-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                       tie=True),
    "qwen2-1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936,
                       tie=True),
    "qwen2-7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
                     tie=False),
    "internlm2-1.8b": dict(hidden=2048, layers=24, heads=16, kv_heads=8, intermediate=8192,
                           vocab=92544, tie=False, arch="internlm2"),
    "internlm2-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                         vocab=92544, tie=False, arch="internlm2"),
}


def build_tokenizer(vocab_size: int, pad_to: int | None = None, eos: str = "<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([line for line in CORPUS.splitlines() for _ in range(20)], trainer)
    if pad_to and pad_to > tok.get_vocab_size():
        tok = _pad_vocab(tok, pad_to)
    bos_id = tok.token_to_id("<s>")
    # BOS on encode(add_special_tokens=True): XTuner's eval hook and LMDeploy rely on it.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token=eos, unk_token="<unk>",
        pad_token="</s>", additional_special_tokens=SPECIAL_TOKENS[3:],
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pad_vocab(tok, size: int):
    """Append plain vocabulary entries (no merges reach them) so ids up to `size` decode."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), size):
        vocab[f"fill{i}"] = i  # printable ASCII: the byte-level decoder maps it to itself
    return Tokenizer.from_str(json.dumps(data))


def build(out: str | Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          vocab_size: int = 1024, max_positions: int = 8192, seed: int = 0,
          shape: str | None = None, device: str = "cpu", arch: str | None = None,
          internlm2_code: str | Path | None = None) -> Path:
    """Write the model folder atomically (a temp folder renamed into place)."""
    import torch
    from transformers import GenerationConfig

    out = Path(out)
    real = SHAPES[shape] if shape else None
    arch = arch or (real or {}).get("arch", "qwen2")
    if arch not in ARCHS:
        raise SystemExit(f"error: --arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    code = internlm2_code_dir(internlm2_code) if arch == "internlm2" else None
    # InternLM2's hub tokenizers end a text with </s> and a chat turn with <|im_end|>
    tokenizer = build_tokenizer(vocab_size, pad_to=real["vocab"] if real else None,
                                eos="</s>" if arch == "internlm2" else "<|im_end|>")
    torch.manual_seed(seed)
    dims = dict(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, initializer_range=0.1,
                tie_word_embeddings=False, vocab_size=len(tokenizer))
    if real:
        dims = dict(hidden_size=real["hidden"], intermediate_size=real["intermediate"],
                    num_hidden_layers=real["layers"], num_attention_heads=real["heads"],
                    num_key_value_heads=real["kv_heads"], initializer_range=0.02,
                    tie_word_embeddings=real["tie"], vocab_size=real["vocab"])
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "internlm2":  # Llama's layout holds its weights; config.json says the rest (RoPE)
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model

        max_positions = 32768 if real else max_positions
        config = Config(max_position_embeddings=max_positions, rms_norm_eps=1e-5, **ids, **dims)
    else:
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model

        config = Config(max_position_embeddings=max_positions, **ids, **dims)
    # real sizes: initialise in bf16 on the target device (CPU init of 7B takes minutes)
    dtype = torch.bfloat16 if real else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Model(config).eval()
    finally:
        torch.set_default_dtype(previous)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted({tokenizer.eos_token_id, end_of_turn}))
    if arch == "internlm2":
        return _atomic_folder(out, lambda tmp: _write_internlm2(tmp, model, tokenizer, code))
    return _save(out, model, tokenizer)


def internlm2_code_dir(given: str | Path | None = None) -> Path:
    """InternLM2's own modeling and configuration files, as XTuner installs them: the folder
    given (or in $INTERNLM2_CODE), this interpreter's XTuner, or the training environment's."""
    names = ("configuration_internlm2.py", "modeling_internlm2.py")
    candidates = [Path(p) for p in (given, os.environ.get("INTERNLM2_CODE")) if p]
    spec = importlib.util.find_spec("xtuner")  # finds the package without importing it
    if spec and spec.submodule_search_locations:
        candidates += [Path(p) / "_lite" / "modelings" / "internlm2" for p in spec.submodule_search_locations]
    candidates += [Path(p) for p in sorted(glob.glob(
        str(ROOT / ".venv-train" / "lib" / "python3*" / "site-packages" / "xtuner" / "_lite" / "modelings" / "internlm2")))]
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return folder
    raise SystemExit("error: --arch internlm2 copies InternLM2's modeling files from an installed XTuner "
                     "(xtuner/_lite/modelings/internlm2/): run scripts/setup_train_env.sh, or pass "
                     "--internlm2-code DIR (or set INTERNLM2_CODE) naming a folder that holds "
                     + " and ".join(names))


# Llama's module names -> InternLM2's (the packed wqkv is made in _pack_internlm2)
_INTERNLM2_NAMES = (("model.embed_tokens.", "model.tok_embeddings."), ("self_attn.o_proj.", "attention.wo."),
                    ("mlp.gate_proj.", "feed_forward.w1."), ("mlp.up_proj.", "feed_forward.w3."),
                    ("mlp.down_proj.", "feed_forward.w2."), ("input_layernorm.", "attention_norm."),
                    ("post_attention_layernorm.", "ffn_norm."), ("lm_head.", "output."))


def _pack_internlm2(state: dict, head_dim: int) -> dict:
    """A Llama-layout state dict under InternLM2's names, q/k/v packed into `wqkv` as InternLM2
    keeps them: per key/value head, its query heads, then its key, then its value."""
    import torch

    out = {}
    for name, w in state.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            k, v = state[name.replace("q_proj", "k_proj")], state[name.replace("q_proj", "v_proj")]
            kv, rest = k.shape[0] // head_dim, w.shape[1:]
            w = torch.cat([w.reshape(kv, -1, head_dim, *rest), k.reshape(kv, 1, head_dim, *rest),
                           v.reshape(kv, 1, head_dim, *rest)], dim=1).reshape(-1, *rest)
            name = name.replace("self_attn.q_proj.", "attention.wqkv.")
        for old, new in _INTERNLM2_NAMES:
            name = name.replace(old, new)
        out[name] = w.contiguous()
    return out


def _write_internlm2(folder: Path, model, tokenizer, code: Path) -> None:
    """The files of an InternLM2 hub repo: config.json with auto_map, InternLM2's own code,
    packed weights, the tokenizer and generation config."""
    from safetensors.torch import save_file

    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    save_file(_pack_internlm2(model.state_dict(), head_dim), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "attn_implementation": "eager", "bias": False, "hidden_act": "silu",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "initializer_range": c.initializer_range, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "pretraining_tp": 1, "torch_dtype": str(model.dtype).removeprefix("torch."),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name in ("configuration_internlm2.py", "modeling_internlm2.py"):
        shutil.copy2(code / name, folder / name)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _make_tokenizer_config_portable(folder)


def _save(out: Path, model, companion, finish=None) -> Path:
    """Write the model folder atomically: the model, its tokenizer / processor (`companion`),
    then `finish(folder)` (default: the tokenizer config made portable)."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        companion.save_pretrained(tmp)
        (finish or _make_tokenizer_config_portable)(tmp)
    return _atomic_folder(out, write)


def _atomic_folder(out: Path, write) -> Path:
    """`write(folder)` into a temp folder beside `out`, then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _make_tokenizer_config_portable(folder: Path) -> None:
    """Readable by transformers 4.48 (XTuner's env), 5.x and LMDeploy alike: transformers 5
    names its own class (TokenizersBackend) and writes the template to chat_template.jinja."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    extra = cfg.pop("extra_special_tokens", None)  # a list in 5.x, a dict of names in 4.x
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


IMAGE_TOKEN = "<image>"


# CLIP vision towers of real sizes (random weights): --clip --shape clip-vit-l-14-336
CLIP_SHAPES: dict[str, dict] = {
    "clip-vit-l-14-336": dict(image_size=336, patch=14, hidden=1024, layers=24, heads=16),
}


def build_clip(out: str | Path, image_size: int = 64, patch: int = 8, hidden: int = 64, layers: int = 2,
               seed: int = 0, heads: int = 4, device: str = "cpu") -> Path:
    """A random CLIP vision tower with its image processor (a CLIP ViT-L/14-336 folder's
    layout): by default small, 64x64 pixels, the visual encoder of the offline LLaVA demo."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch,
                              projection_dim=hidden)
    with torch.device(device):
        model = CLIPVisionModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return _save(Path(out), model, processor, finish=lambda folder: _legacy_clip_keys(folder / "model.safetensors"))


def _legacy_clip_keys(path: Path) -> None:
    """transformers 5 saves CLIPVisionModel's weights without their `vision_model.` prefix,
    which 4.x (XTuner's environment) then does not find and silently initialises anew; the
    prefixed names load in both."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    save_file({(k if k.startswith("vision_model.") else f"vision_model.{k}"): v for k, v in state.items()},
              str(path), metadata={"format": "pt"})


def build_llava(out: str | Path, llm: str | Path, image_size: int = 64, patch: int = 8, hidden: int = 64,
                layers: int = 2, seed: int = 0, vision: str | Path | None = None) -> Path:
    """A tiny LLaVA in the Hugging Face layout (LlavaForConditionalGeneration + LlavaProcessor,
    what transformers and LMDeploy's VLM pipeline read): a small random CLIP vision tower, a
    random two-layer projector and the chat model at `llm` as the language model, with
    <image> added to its tokenizer."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                              CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
    text.resize_token_embeddings(len(tokenizer))
    if vision:  # an existing tower (the demo's "before": its vision tower, an untrained projector)
        tower = CLIPVisionModel.from_pretrained(vision)
        image_size, patch = tower.config.image_size, tower.config.patch_size
    vision_config = tower.config if vision else CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch, projection_dim=hidden)
    config = LlavaConfig(vision_config=vision_config, text_config=text.config,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(image_size // patch) ** 2)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    if vision:
        model.model.vision_tower.load_state_dict(tower.state_dict())
    model.generation_config = text.generation_config
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return _save(out, model, processor)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/tiny-chat")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", choices=sorted(SHAPES) + sorted(CLIP_SHAPES),
                   help="random weights of a real model size (a clip-* shape with --clip)")
    p.add_argument("--arch", choices=ARCHS, help="model architecture (default: qwen2; the shape's own with --shape)")
    p.add_argument("--internlm2-code", help="with --arch internlm2: the folder holding InternLM2's "
                   "configuration_internlm2.py and modeling_internlm2.py (default: the installed XTuner's)")
    p.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster for --shape)")
    p.add_argument("--llava", metavar="CHAT_MODEL", help="build a tiny LLaVA around this chat model instead")
    p.add_argument("--vision", help="with --llava: this CLIP vision tower (default: a new random one)")
    p.add_argument("--clip", action="store_true", help="build only a tiny CLIP vision tower")
    a = p.parse_args()
    if a.clip:
        print(build_clip(a.out, seed=a.seed, device=a.device, **CLIP_SHAPES.get(a.shape, {})))
        return
    if a.llava:
        print(build_llava(a.out, a.llava, hidden=a.hidden, layers=a.layers, seed=a.seed, vision=a.vision))
        return
    print(build(a.out, hidden=a.hidden, layers=a.layers, seed=a.seed, shape=a.shape, device=a.device,
                arch=a.arch, internlm2_code=a.internlm2_code))


if __name__ == "__main__":
    main()
