"""Model folders whose architecture transformers 5 serves with its own classes, whatever code
the folder names.

InternLM2 (internlm2-chat-1_8b, internlm2_5-7b-chat and what XTuner's `convert merge` writes
from them) ships its own modeling code (`auto_map`), written for transformers 4.x: on 5.x it
fails (`rope_scaling` read as `type`, `_tied_weights_keys` as a list). Its layout is Llama's with
other names and the query, key and value projections packed in one `wqkv` (per key/value head:
its query heads, then its key, then its value). So it is loaded into transformers' own Llama
classes: the weights are unpacked and renamed as they load (transformers' checkpoint conversion
mapping, the mechanism it uses for its own format changes), and no remote code runs. Static
cache, compile, continuous batching and quantized loading then apply as to any Llama.

A LoRA adapter trained on InternLM2's modules (XTuner's `pth_to_hf`: `wqkv`, `wo`, `w1`-`w3`,
and `output`, which XTuner's all-linear targeting takes too) is converted the same way before
PEFT loads it: `wqkv`'s B matrix is split by rows like the
weight, its A matrix shared by q, k and v (B_q A x is exactly the q rows of B A x).
"""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidRequest

def read_config(model_path: str | Path, name: str = "config.json") -> dict:
    """One of the folder's JSON files (config.json by default) as a dict ({} when there is none
    or it is unreadable)."""
    try:
        config = json.loads((Path(model_path) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def read_eos_ids(model_path: str | Path) -> list[int]:
    """The end-of-reply ids of the folder's generation_config.json (else config.json)."""
    for name in ("generation_config.json", "config.json"):
        eos = read_config(model_path, name).get("eos_token_id")
        if eos is not None:
            eos = eos if isinstance(eos, list) else [eos]
            return [int(i) for i in eos if isinstance(i, int)]
    return []


def is_vision_model(model_path: str | Path) -> bool:
    """A model folder whose config has a vision tower (LLaVA and kin)."""
    return "vision_config" in read_config(model_path)


@dataclass
class NativeModel:
    config: Any          # the transformers config the model is built with
    model_type: str      # the folder's own model_type (its chat template family)
    model_class: Any     # the class whose from_pretrained loads it


def native_model(model_path: str, session_len: int) -> NativeModel:
    """How to load the causal LM in `model_path` with transformers' own classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = read_config(model_path)
    model_type = str(raw.get("model_type", ""))
    if model_type == "internlm2":
        return NativeModel(internlm2_config(raw, session_len), model_type, _internlm2_class())
    try:
        config = AutoConfig.from_pretrained(model_path)
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise InvalidRequest(
            f"{model_path}: model_type {model_type!r} exists only as the folder's own code, which this server "
            "does not run; transformers serves natively: InternLM2 and the architectures transformers "
            "itself has (Llama, Qwen2, ...). Serve it with --backend pytorch or turbomind (LMDeploy) "
            "if LMDeploy supports it", param="model_path") from None
    return NativeModel(config, model_type or str(getattr(config, "model_type", "")), AutoModelForCausalLM)


def internlm2_config(raw: dict, session_len: int) -> Any:
    """InternLM2's config.json values as a LlamaConfig."""
    from transformers import LlamaConfig

    def need(key: str) -> Any:
        if key not in raw:
            raise InvalidRequest(f"config.json: an InternLM2 config needs {key!r}", param="model_path")
        return raw[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    max_positions = int(raw.get("max_position_embeddings", 2048))
    rope = {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000))}
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict) and scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        factor = float(scaling.get("factor", 1.0))
        if kind == "linear":
            rope.update(rope_type="linear", factor=factor)
        elif kind == "dynamic":
            # InternLM2's dynamic NTK changes RoPE's base only once a position passes
            # max_position_embeddings: within that window it is plain RoPE, which lets a static
            # cache and CUDA graphs run. Past it, transformers' own dynamic RoPE (same formula).
            if session_len > max_positions:
                rope.update(rope_type="dynamic", factor=factor)
        else:
            raise InvalidRequest(f"config.json: rope_scaling type {kind!r} is not InternLM2's (linear, dynamic)",
                                 param="model_path")
    eos = raw.get("eos_token_id", 2)
    return LlamaConfig(
        vocab_size=int(need("vocab_size")), hidden_size=hidden, intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")), num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads), head_dim=hidden // heads,
        hidden_act=raw.get("hidden_act", "silu"), max_position_embeddings=max_positions,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_parameters=rope,
        attention_bias=bool(raw.get("bias", True)), mlp_bias=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id", 1), eos_token_id=eos, pad_token_id=raw.get("pad_token_id", 0))


# InternLM2's names -> Llama's (the packed wqkv is split by _UnpackQKV)
_RENAMES = ((r"tok_embeddings", "embed_tokens"), (r"attention\.wo", "self_attn.o_proj"),
            (r"feed_forward\.w1", "mlp.gate_proj"), (r"feed_forward\.w3", "mlp.up_proj"),
            (r"feed_forward\.w2", "mlp.down_proj"), (r"attention_norm", "input_layernorm"),
            (r"ffn_norm", "post_attention_layernorm"), (r"^output\.", "lm_head."))
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def unpack_qkv(tensor: Any, heads: int, kv_heads: int, head_dim: int) -> tuple[Any, Any, Any]:
    """InternLM2's packed wqkv rows (weight, bias or a LoRA B) -> q, k and v rows."""
    groups = heads // kv_heads
    rest = tensor.shape[1:]
    packed = tensor.reshape(kv_heads, groups + 2, head_dim, *rest)
    return (packed[:, :groups].reshape(heads * head_dim, *rest).contiguous(),
            packed[:, groups].reshape(kv_heads * head_dim, *rest).contiguous(),
            packed[:, groups + 1].reshape(kv_heads * head_dim, *rest).contiguous())


@functools.cache
def _internlm2_class() -> type:
    from transformers import LlamaForCausalLM
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

    class _UnpackQKV(ConversionOps):
        def convert(self, input_dict: dict, source_patterns: list, target_patterns: list, **kwargs: Any) -> dict:
            tensors = next(iter(input_dict.values()))
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            c = kwargs["config"]
            return dict(zip(target_patterns, unpack_qkv(tensor, c.num_attention_heads, c.num_key_value_heads,
                                                         c.head_dim)))

    class InternLM2AsLlamaForCausalLM(LlamaForCausalLM):
        """An InternLM2 checkpoint in transformers' Llama classes (weights converted as they load)."""

    register_checkpoint_conversion_mapping(InternLM2AsLlamaForCausalLM.__name__, [
        *(WeightRenaming(src, dst) for src, dst in _RENAMES),
        WeightConverter("attention.wqkv", list(_QKV), operations=[_UnpackQKV()]),
    ], overwrite=True)
    return InternLM2AsLlamaForCausalLM


# -- LoRA adapters trained on InternLM2's own modules ------------------------------------------
_LEAVES = {"wo": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "output": "lm_head"}
_PARENTS = {"attention": "self_attn", "feed_forward": "mlp"}


def _llama_modules(path: str) -> list[str]:
    """A module's dotted path in InternLM2 (a LoRA target, as a bare name or a full path as PEFT's
    all-linear writes them, or the module part of an adapter weight's key) as the Llama layout's:
    wqkv becomes q_proj, k_proj and v_proj."""
    *parents, leaf = path.split(".")
    parents = [_PARENTS.get(p, p) for p in parents]
    leaves = [q.rpartition(".")[2] for q in _QKV] if leaf == "wqkv" else [_LEAVES.get(leaf, leaf)]
    return [".".join([*parents, name]) for name in leaves]


def convert_internlm2_adapter(adapter_path: str, config: Any) -> Path:
    """A copy of a PEFT LoRA adapter for InternLM2 with Llama's module names (in a temp folder the
    caller removes): wqkv's B split into q/k/v by rows, its A shared."""
    from safetensors.torch import load_file, save_file

    src = Path(adapter_path)
    cfg_path = src / "adapter_config.json"
    try:
        adapter_config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{cfg_path}: not a PEFT adapter config ({exc})", param="adapter_path") from None
    weights = src / "adapter_model.safetensors"
    if weights.exists():
        state = load_file(str(weights))
    elif (src / "adapter_model.bin").exists():
        import torch

        state = torch.load(src / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise InvalidRequest(f"{src}: no adapter_model.safetensors or adapter_model.bin", param="adapter_path")
    out: dict[str, Any] = {}
    for name, tensor in state.items():
        module, lora, rest = name.partition(".lora_")  # base_model.model.<module>.lora_A.weight
        modules = _llama_modules(module)
        if len(modules) == 1:  # XTuner's LoRA takes `output` (the head) too: renamed like the rest
            out[modules[0] + lora + rest] = tensor
        elif rest.startswith("A."):  # wqkv's A: the same for q, k and v
            out.update((m + lora + rest, tensor.clone()) for m in modules)
        else:  # wqkv's B: its rows, split as the weight is
            parts = unpack_qkv(tensor, config.num_attention_heads, config.num_key_value_heads, config.head_dim)
            out.update((m + lora + rest, part) for m, part in zip(modules, parts))
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        raise InvalidRequest(f"{cfg_path}: target_modules as a pattern ({targets!r}) cannot be converted "
                             "for InternLM2: list the modules", param="adapter_path")
    adapter_config["target_modules"] = sorted({n for t in targets for n in _llama_modules(t)})
    adapter_config.pop("base_model_name_or_path", None)
    tmp = Path(tempfile.mkdtemp(prefix="internlm2-adapter-"))
    try:
        save_file(out, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp
