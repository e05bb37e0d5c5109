"""LMDeploy backend (TurboMind or PyTorch engine) through LMDeploy's public API only:
`pipeline`, `TurbomindEngineConfig` / `PytorchEngineConfig`, `GenerationConfig`.

We render the prompt ourselves (same templates and truncation as every backend) and hand
LMDeploy the text with `do_preprocess=False`; content control tokens are neutralised first,
since LMDeploy parses special tokens anywhere in the text. A turn with images goes to
LMDeploy's VLM pipeline as OpenAI messages (its chat template places the image tokens), the
text neutralised the same way. LMDeploy is imported lazily.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from .architectures import is_vision_model
from .base import Engine, Generation, Piece
from .errors import ContextOverflow, EngineError, InvalidRequest
from .prompts import ChatPrompt
from .settings import EngineSettings, SamplingParams, check_schema
from .versions import require


def backend_config(settings: EngineSettings) -> Any:
    """Our settings -> LMDeploy's TurbomindEngineConfig / PytorchEngineConfig."""
    from lmdeploy import PytorchEngineConfig, TurbomindEngineConfig

    lm = settings.lmdeploy
    if settings.dtype not in ("auto", "float16", "bfloat16"):
        raise InvalidRequest(f"dtype {settings.dtype!r} is not supported by LMDeploy "
                             "(auto, float16, bfloat16)", param="dtype")
    common: dict[str, Any] = dict(dtype=settings.dtype, tp=lm.tp, session_len=settings.session_len,
                                  cache_max_entry_count=lm.cache_max_entry_count,
                                  quant_policy=lm.quant_policy)
    if lm.max_batch_size:
        common["max_batch_size"] = lm.max_batch_size
    if settings.backend == "turbomind":
        return TurbomindEngineConfig(model_format=lm.model_format, **common)
    if settings.backend == "pytorch":
        if not lm.cache_max_entry_count < 1:
            raise InvalidRequest("lmdeploy.cache_max_entry_count must be < 1 for the PyTorch engine",
                                 param="lmdeploy.cache_max_entry_count")
        # The PyTorch engine reads AWQ from the checkpoint's quantization_config itself.
        return PytorchEngineConfig(model_format="awq" if lm.model_format == "awq" else None,
                                   enable_mp_engine=lm.mp_engine, **common)
    raise InvalidRequest(f"backend {settings.backend!r} is not an LMDeploy engine", param="backend")


def generation_config(sampling: SamplingParams, stop_token_ids: Sequence[int] = ()) -> Any:
    """Our sampling -> GenerationConfig. do_sample must be set explicitly: LMDeploy >= 0.6
    defaults it to False and then ignores temperature/top_p/top_k (greedy)."""
    from lmdeploy import GenerationConfig

    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        repetition_penalty=sampling.repetition_penalty, random_seed=sampling.seed,
        stop_token_ids=list(stop_token_ids) or None, ignore_eos=sampling.ignore_eos,
        skip_special_tokens=True,
        # guided decoding (xgrammar, PyTorch engine): OpenAI's response_format as LMDeploy takes it
        **({"response_format": sampling.response_format} if sampling.response_format else {}))


class LMDeployEngine(Engine):
    def __init__(self, settings: EngineSettings, pipeline_kwargs: dict | None = None):
        require("lmdeploy", settings.backend)
        from lmdeploy import pipeline

        super().__init__()
        self.settings = settings
        self.session_len = settings.session_len
        self.model_name = Path(settings.model_path).name or settings.model_path
        self.prompt = ChatPrompt.from_pretrained(settings.model_path, settings.chat_template)
        self.pipe = pipeline(settings.model_path, backend_config=backend_config(settings),
                             log_level="WARNING", **(pipeline_kwargs or {}))
        # continuous batching: as many as LMDeploy batches (its default is 128 on these GPUs)
        self.max_concurrency = settings.lmdeploy.max_batch_size or 128
        # GenerationConfig has no frequency / presence penalty (repetition_penalty only)
        self.features = frozenset({"completions", "response_format"})
        # a vision-language model (llava-hf, Qwen2-VL, InternVL, ...): LMDeploy's pipeline is then
        # its VLM pipeline, which encodes the images with the model's own vision tower
        self.accepts_images = is_vision_model(settings.model_path)

    def check_features(self, sampling: SamplingParams) -> SamplingParams:
        sampling = super().check_features(sampling)
        if sampling.response_format:  # LMDeploy would fail inside its engine loop (a 500)
            check_schema(sampling.response_format)
        return sampling

    def _prepare(self, messages: Sequence[Any], sampling: SamplingParams | None, session_id: str,
                 continue_final: bool = False) -> Generation:
        gen = super()._prepare(messages, sampling, session_id, continue_final)
        if continue_final and any(m.get("image_urls") for m in gen.messages):
            raise InvalidRequest("continue_final_message: not supported with images by the LMDeploy backend "
                                 "(its VLM pipeline applies the chat template itself)", param="messages")
        return gen

    def generate(self, gen: Generation) -> Iterator[Piece]:
        session = self.pipe.session()
        gen.on_cancel(session.abort)
        with_images = any(m.get("image_urls") for m in gen.messages)
        if with_images:  # LMDeploy's VLM pipeline places and encodes the images itself
            prompt: Any = vl_messages(gen.messages, self.prompt)
        else:
            prompt = self.prompt.plain_text(gen.raw_prompt) if gen.raw_prompt is not None \
                else self.prompt.text(gen.messages, gen.continue_final)
        outputs = self.pipe.stream_infer(prompt, sessions=session,
                                         gen_config=generation_config(gen.sampling,
                                                                      self.prompt.stop_token_ids),
                                         do_preprocess=with_images)
        # LMDeploy's incremental text can drop a tail that ends inside a multi-byte character
        # (seen on the H100 with concurrent sessions): stream its text, and once finished emit
        # what one decode of all the ids adds. Decoding per delta here halved N=64 throughput.
        ids: list[int] = []
        raw: list[str] = []
        try:
            for out in outputs:
                if out.finish_reason == "error":
                    raise _error(out)
                ids.extend(out.token_ids or [])
                raw.append(out.text)
                yield Piece(out.text, completion_tokens=out.generate_token_len,
                            prompt_tokens=out.input_token_len or None,
                            finish_reason=out.finish_reason if out.finish_reason in ("stop", "length")
                            else None)
            yield Piece(_missing_tail(self.prompt.tokenizer, ids, "".join(raw)))
        finally:
            try:
                session.abort()  # no-op when finished; stops it when the consumer went away
                session.close()
            except Exception:
                pass

    def close(self) -> None:
        self.cancel_all()
        self.pipe.close()


def vl_messages(messages: Sequence[dict], prompt: ChatPrompt) -> list[dict]:
    """Checked messages as LMDeploy's VLM pipeline takes them: OpenAI content parts, the images
    as their data URLs, every text with control tokens neutralised (LMDeploy applies the chat
    template and tokenizes the result)."""
    out = []
    for m in messages:
        text = prompt.plain_text(m["content"])
        if m.get("image_urls"):
            parts = [{"type": "image_url", "image_url": {"url": u}} for u in m["image_urls"]]
            out.append({"role": m["role"], "content": parts + [{"type": "text", "text": text}]})
        else:
            out.append({"role": m["role"], "content": text})
    return out


def _missing_tail(tokenizer: Any, ids: list[int], streamed: str) -> str:
    full = tokenizer.decode(ids, skip_special_tokens=True)
    return full[len(streamed):] if full.startswith(streamed) else ""


def _error(out: Any) -> EngineError:
    msg = f"LMDeploy: {out.error_message or out.error_code}"
    low = msg.lower()
    if "length" in low or "context" in low:
        return ContextOverflow(msg, param="messages")
    if "memory" in low:
        return EngineError("out of memory: " + msg)
    return EngineError(msg)
