"""LMDeploy backend (TurboMind or PyTorch engine) through LMDeploy's public API only:
`pipeline`, `TurbomindEngineConfig` / `PytorchEngineConfig`, `GenerationConfig`.

We render the prompt ourselves (same templates and truncation as every backend) and hand
LMDeploy the text with `do_preprocess=False`; content control tokens are neutralised first,
since LMDeploy parses special tokens anywhere in the text. LMDeploy is imported lazily.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from .base import (Delta, Engine, Message, SessionRegistry, StopStringFilter, UsageMeter,
                   check_messages)
from .errors import ContextOverflow, EngineError, InvalidRequest
from .prompts import ChatPrompt
from .settings import EngineSettings, SamplingParams


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
        return PytorchEngineConfig(model_format="awq" if lm.model_format == "awq" else None, **common)
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
        skip_special_tokens=True)


class LMDeployEngine(Engine):
    def __init__(self, settings: EngineSettings, pipeline_kwargs: dict | None = None):
        from lmdeploy import pipeline

        self.settings = settings
        self.model_name = Path(settings.model_path).name or settings.model_path
        self.prompt = ChatPrompt.from_pretrained(settings.model_path, settings.chat_template)
        self.pipe = pipeline(settings.model_path, backend_config=backend_config(settings),
                             log_level="WARNING", **(pipeline_kwargs or {}))
        self._sessions: SessionRegistry[tuple[Any, threading.Event]] = SessionRegistry()

    def stream_chat(self, messages: Sequence[Message], sampling: SamplingParams | None = None,
                    session_id: str = "default") -> Iterator[Delta]:
        sampling = (sampling or SamplingParams()).validate()
        msgs, ids = self.prompt.fit(check_messages(messages), self.settings.session_len,
                                    sampling.max_new_tokens)
        gen_config = generation_config(sampling, self.prompt.stop_token_ids)
        self._sessions.ensure_free(session_id)  # refuse before LMDeploy opens a session
        entry = self._sessions.add(session_id, (self.pipe.session(), threading.Event()))
        outputs = self.pipe.stream_infer(self.prompt.text(msgs), sessions=entry[0],
                                         gen_config=gen_config, do_preprocess=False)
        return self._consume(outputs, entry, session_id, sampling, UsageMeter(len(ids)))

    def _consume(self, outputs: Iterator, entry: tuple[Any, threading.Event], session_id: str,
                 sampling: SamplingParams, meter: UsageMeter) -> Iterator[Delta]:
        session, cancelled = entry
        stop = StopStringFilter(sampling.stop)
        # LMDeploy's incremental text can drop a tail that ends inside a multi-byte character
        # (seen on the H100 with concurrent sessions): stream its text, and once finished emit
        # what one decode of all the ids adds. Decoding per delta here halved N=64 throughput.
        ids: list[int] = []
        raw: list[str] = []
        finish = None
        try:
            for out in outputs:
                if out.finish_reason == "error":
                    raise _error(out)
                meter.prompt_tokens = out.input_token_len or meter.prompt_tokens
                meter.tokens_out(out.generate_token_len)
                finish = out.finish_reason or finish
                ids.extend(out.token_ids or [])
                raw.append(out.text)
                text = stop.feed(out.text)
                if text:
                    yield Delta(text)
                if stop.stopped:
                    session.abort()
                    finish = "stop"
                    break
            tail = stop.feed(_missing_tail(self.prompt.tokenizer, ids, "".join(raw))) + stop.flush()
            if tail:
                yield Delta(tail)
            if cancelled.is_set() or finish == "abort":
                finish = "cancelled"
            yield Delta("", meter.usage(finish or "stop"))
        finally:
            self._sessions.remove(session_id, entry)
            try:
                session.abort()  # no-op when finished; stops it when the consumer went away
                session.close()
            except Exception:
                pass

    def cancel(self, session_id: str) -> bool:
        entry = self._sessions.get(session_id)
        if entry is None:
            return False
        session, cancelled = entry
        cancelled.set()
        session.abort()
        return True

    def close(self) -> None:
        self.pipe.close()


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
