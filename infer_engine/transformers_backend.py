"""HF transformers backend: `generate` with a streamer on a worker thread.

Generations run one at a time (a lock around `generate`): plain transformers has no
continuous batching, and serialising keeps seeded sampling reproducible and outputs
independent of other sessions. Use an LMDeploy backend for concurrent throughput.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from .base import Engine, Generation, Piece
from .errors import EngineError
from .prompts import ChatPrompt
from .settings import EngineSettings

_DONE = object()       # the worker has finished
_CANCELLED = object()  # cancel() woke the consumer; the worker stops within one step


class IncrementalDecoder:
    """Decode a growing token list into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        dec = self.tokenizer.decode
        prefix_text = dec(self.ids[self.prefix:self.read], skip_special_tokens=True)
        new_text = dec(self.ids[self.prefix:], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        dec = self.tokenizer.decode
        rest = dec(self.ids[self.prefix:], skip_special_tokens=True)
        done = dec(self.ids[self.prefix:self.read], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return rest[len(done):]


class _Run:
    """One generation's shared state between the worker thread and the consuming generator."""

    def __init__(self, tokenizer: Any, eos_ids: set[int]):
        self.queue: queue.Queue = queue.Queue()
        self.stopped = threading.Event()  # cancelled, or the consumer went away
        self.decoder = IncrementalDecoder(tokenizer)
        self.eos_ids = eos_ids
        self.tokens = 0
        self.hit_eos = False


class _Streamer:
    """transformers streamer protocol: put(tensor) per step (the prompt first), end()."""

    def __init__(self, run: _Run):
        self.run, self.prompt_seen = run, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = [int(t) for t in value.reshape(-1).tolist()]
        run = self.run
        if run.stopped.is_set():
            return
        if ids and ids[-1] in run.eos_ids:
            run.hit_eos = True
            ids = ids[:-1]
        run.tokens += len(ids)  # the end-of-turn token is not counted
        run.queue.put(Piece(run.decoder.add(ids) if ids else "", completion_tokens=run.tokens))

    def end(self) -> None:
        pass


class TransformersEngine(Engine):
    def __init__(self, settings: EngineSettings):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__()
        self.settings = settings
        self.session_len = settings.session_len
        self.model_name = Path(settings.model_path).name or settings.model_path
        self.device = settings.device if settings.device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            settings.dtype)
        if dtype is None:  # auto: bf16 where the GPU has it, fp32 on CPU
            dtype = torch.bfloat16 if self.device.startswith("cuda") and torch.cuda.is_bf16_supported() \
                else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        model = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=dtype)
        if settings.adapter_path:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, settings.adapter_path)
        self.model = model.to(self.device).eval()
        self.prompt = ChatPrompt(self.tokenizer, settings.chat_template,
                                 getattr(self.model.config, "model_type", ""))
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_ids = set(gen_eos) | set(self.prompt.stop_token_ids)
        self._torch = torch
        self._lock = threading.Lock()       # one generate() at a time

    def generate(self, gen: Generation) -> Iterator[Piece]:
        run = _Run(self.tokenizer, self.eos_ids)
        gen.on_cancel(lambda: (run.stopped.set(), run.queue.put(_CANCELLED)))
        worker = threading.Thread(target=self._work, args=(run, gen), daemon=True,
                                  name=f"generate-{gen.session_id}")
        worker.start()
        try:
            while True:
                item = run.queue.get()
                if item is _CANCELLED:
                    break
                if item is _DONE:
                    worker.join()  # it is on its last line
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            if not run.stopped.is_set():
                yield Piece(run.decoder.flush(), completion_tokens=run.tokens,
                            finish_reason="stop" if run.hit_eos else "length")
        finally:
            run.stopped.set()  # a consumer that stops reading stops the generation (within a step)

    def _work(self, run: _Run, gen: Generation) -> None:
        torch, sampling = self._torch, gen.sampling
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                return torch.full((input_ids.shape[0],), run.stopped.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
            repetition_penalty=sampling.repetition_penalty, eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
            else sorted(self.eos_ids)[0])
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if sampling.ignore_eos:
            kwargs["min_new_tokens"] = sampling.max_new_tokens
        try:
            with self._lock:
                if run.stopped.is_set():
                    return
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                input_ids = torch.tensor([gen.prompt_ids], device=self.device)
                with torch.inference_mode():
                    self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        streamer=_Streamer(run),
                                        stopping_criteria=StoppingCriteriaList([_Stop()]), **kwargs)
        except Exception as exc:  # surfaced to the caller as a readable error
            oom = "out of memory" in str(exc).lower()
            run.queue.put(EngineError(("out of memory: " if oom else "generation failed: ") + str(exc)))
        finally:
            run.queue.put(_DONE)

    def close(self) -> None:
        self.cancel_all()
        self.model = None
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()
