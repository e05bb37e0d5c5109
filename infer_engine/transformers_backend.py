"""HF transformers backend.

Concurrent sessions are decoded together with transformers' own continuous batching
(`model.init_continuous_batching`: a paged KV cache, per-request temperature/top-p/top-k,
cancel, streaming): --transformers-max-batch-size sessions at a time (8 on a CPU, 64 on a GPU
by default). Requests it cannot serve per request — a seed (one RNG for the whole batch), a
repetition or OpenAI penalty, constrained JSON — and every request with a batch size of 1 run
through `generate` with a streamer, one at a time, on one worker thread, beside the batch (which
runs on a twin of the model: see `_twin`). A seeded one samples from its own generator.

On a GPU a lone stream is faster through `generate` with a static KV cache of the session's
length and the decode step compiled with CUDA graphs (`--transformers-compile`): compiled at
start-up, replayed on the one worker thread (CUDA graphs are recorded per thread). A request
that arrives while nothing runs takes that path; requests that arrive together are batched.

Models load with transformers' own classes (`architectures.native_model`: InternLM2 as Llama),
optionally in 4 or 8 bits (`--bits`, bitsandbytes, as `xtuner chat --bits 4` does).
"""
from __future__ import annotations

import itertools
import json
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

from loguru import logger

from .architectures import convert_internlm2_adapter, is_vision_model, native_model, read_config
from .base import Engine, Generation, Piece
from .errors import BackendUnavailable, EngineError, InvalidRequest
from .prompts import ChatPrompt
from .settings import EngineSettings, clean_error, response_schema
from .versions import require

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
        self.eos_ids = eos_ids  # empty with ignore_eos: an end token is then one token more
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


class _Batcher:
    """transformers' ContinuousBatchingManager, fed requests and read by one dispatcher thread
    that routes each output to its request's queue."""

    def __init__(self, model: Any, eos_ids: set[int], pad_id: int, batch: int, session_len: int,
                 on_gpu: bool, options: dict, graphs: bool = True):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        # The sampling processors exist only when the defaults differ from "off"; each request
        # then brings its own values (per_request_processors).
        gen_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=40,
                                      eos_token_id=sorted(eos_ids), pad_token_id=pad_id,
                                      max_new_tokens=session_len)
        cb = ContinuousBatchingConfig(per_request_processors=True, max_requests_per_batch=batch)
        if on_gpu:
            # CUDA graphs for the batch's steps (without flash-attention transformers leaves them
            # off): on the H200, InternLM2-1.8B at 16 streams, 601 tok/s against 150 without;
            # but not beside the compiled one-stream path (`graphs` False): the batch capturing
            # its graphs while that path replays its own gave other tokens now and then (the
            # conformance suite's concurrent greedy replies, 1 run in 2 on the H200).
            # Its own sizing of the cache: sized by hand (every session at full length) the
            # same run gave 68 tok/s with 14 s to the first token.
            cb.use_cuda_graph = graphs
        else:  # sized by hand: on a CPU the automatic sizing fills GBs of masks at start
            cb.num_blocks = -(-session_len * batch // cb.page_size) + 1
            cb.max_batch_tokens = 512
        for key, value in options.items():  # --transformers-cb-options, checked by name
            if not hasattr(cb, key):
                raise InvalidRequest(f"transformers.cb_options: ContinuousBatchingConfig has no field {key!r}",
                                     param="transformers.cb_options")
            setattr(cb, key, value)
        self.manager = model.init_continuous_batching(generation_config=gen_config,
                                                      continuous_batching_config=cb)
        # Started from a daemon thread, its generation thread is a daemon too (Python threads
        # inherit the flag): an engine that is never closed does not keep the process alive.
        starter = threading.Thread(target=self.manager.start, daemon=True)
        starter.start()
        starter.join()
        self.vocab = model.config.vocab_size
        self._queues: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._running = True
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True, name="cb-dispatch")
        self._dispatcher.start()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._queues)

    def _dispatch(self) -> None:
        while self._running:
            out = self.manager.get_result(timeout=0.5)
            if out is None:
                continue
            with self._lock:
                q = self._queues.get(out.request_id)
            if q is not None:
                q.put(out)

    def submit(self, request_id: str, ids: list[int], sampling: Any) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._queues[request_id] = q
        if sampling.greedy:  # exactly argmax: the only token top-k 1 keeps
            knobs = dict(temperature=1.0, top_p=1.0, top_k=1)
        else:
            knobs = dict(temperature=sampling.temperature, top_p=sampling.top_p,
                         top_k=sampling.top_k or self.vocab)  # our 0 = off
        added = self.manager.add_request(ids, request_id=request_id, max_new_tokens=sampling.max_new_tokens,
                                         streaming=True, eos_token_id=-1 if sampling.ignore_eos else None,
                                         **knobs)
        if added is None:
            self.forget(request_id)
            raise BackendUnavailable("transformers: the batch is not taking requests (see the log)")
        return q

    def forget(self, request_id: str, cancel: bool = False) -> None:
        with self._lock:
            self._queues.pop(request_id, None)
        if cancel:
            self.manager.cancel_request(request_id)

    def close(self) -> None:
        """Stop the batch's threads and free it now: a thread of it still inside torch when the
        interpreter exits aborts the process ("terminate called without an active exception",
        seen at the end of a test session)."""
        if not self._running:
            return
        self._running = False
        self.manager.stop(block=True, timeout=30)
        if self.manager.is_running():
            logger.warning("transformers: the batch did not stop in 30 s; stopping it hard")
            self.manager.stop(block=True, timeout=30, hard_stop=True)
        self._dispatcher.join(timeout=5)
        self.manager = None


class TransformersEngine(Engine):
    def __init__(self, settings: EngineSettings):
        require("transformers", "transformers")
        import torch

        super().__init__()
        self.settings = settings
        self.session_len = settings.session_len
        self.model_name = Path(settings.model_path).name or settings.model_path
        self.device = settings.device if settings.device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = self.device.startswith("cuda")
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            settings.dtype)
        if dtype is None:  # auto: bf16 where the GPU has it, fp32 on CPU
            dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
        held = torch.cuda.memory_allocated() if on_gpu else 0
        load: dict[str, Any] = dict(dtype=dtype)
        if settings.bits:
            load.update(_bitsandbytes(settings.bits, dtype, on_gpu), device_map={"": self.device})
        self.processor = None
        if is_vision_model(settings.model_path):  # LLaVA and kin: images too
            from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

            config = AutoConfig.from_pretrained(settings.model_path)
            self.processor = AutoProcessor.from_pretrained(settings.model_path)
            self.tokenizer = self.processor.tokenizer
            model = AutoModelForImageTextToText.from_pretrained(settings.model_path, **load)
            model_type = getattr(config, "model_type", "")
        else:
            native = native_model(settings.model_path, settings.session_len)
            self.tokenizer = _tokenizer(settings.model_path, settings.trust_remote_code, native.config)
            model = native.model_class.from_pretrained(settings.model_path, config=native.config, **load)
            model_type = native.model_type
        if settings.adapter_path:
            model = _with_adapter(model, settings.adapter_path, model_type)
        self.model = (model if settings.bits else model.to(self.device)).eval()
        # what the weights take on the GPU (before any cache): the figure --bits changes
        self.weights_gib = (torch.cuda.memory_allocated() - held) / 2**30 if on_gpu else 0.0
        if on_gpu:
            logger.info("transformers: weights take {:.2f} GiB of GPU memory ({})", self.weights_gib,
                        f"{settings.bits} bits" if settings.bits else str(dtype).removeprefix("torch."))
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.prompt = ChatPrompt(self.tokenizer, settings.chat_template, model_type, gen_eos)
        if self.processor is not None:
            self.accepts_images = True
            self.prompt.image_tokens = self.processor.image_token * _image_seq_length(config)
        self.eos_ids = set(gen_eos) | set(self.prompt.stop_token_ids)
        self._torch = torch
        # Every generate() runs on this one thread: one at a time, and CUDA graphs recorded once
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="generate",
                                          initializer=_cuda_graph_thread_state if on_gpu else None)
        self._route = threading.Lock()
        self._alone_busy = 0      # generate() runs queued or running on the worker
        self._static_cache = None
        if settings.transformers.compile == "on" or (settings.transformers.compile == "auto" and on_gpu):
            self._static_cache = self._compile_one_stream()
        batch = settings.transformers.max_batch_size or (64 if on_gpu else 8)
        if self.processor is not None:  # continuous batching takes token ids only, no images
            batch = 1
        self.max_concurrency = batch
        self._batcher = None
        if batch > 1:  # after the static cache: its automatic sizing takes most of what is free
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
            try:
                self._batcher = _Batcher(_twin(self.model), self.eos_ids, pad, batch, settings.session_len, on_gpu,
                                         _cb_options(settings.transformers.cb_options),
                                         graphs=self._static_cache is None)
            except InvalidRequest:
                raise
            except Exception as exc:  # an older transformers, a model CB does not take: still serve
                logger.warning("transformers: continuous batching unavailable ({}: {}); one generation "
                               "at a time", type(exc).__name__, exc)
                self.max_concurrency = 1
        self._ids = itertools.count()
        self.features = frozenset({"frequency_penalty", "presence_penalty", "completions", "response_format"})
        self._grammars = _Grammars(self.tokenizer, self.model.config, self.eos_ids)

    def _compile_one_stream(self) -> Any:
        """A static KV cache of the session's length for one stream; the decode step compiled
        (transformers compiles a static-cache generate with CUDA graphs) by a short warm-up."""
        from transformers import StaticCache

        if getattr(getattr(self.model, "hf_quantizer", None), "is_compileable", True) is False:
            logger.info("transformers: this quantization cannot be compiled; one stream decodes eagerly")
            return None
        cache = StaticCache(config=self.model.config, max_cache_len=self.session_len)
        started = time.perf_counter()
        ids = self.prompt.encode([{"role": "user", "content": "hello"}])
        for _ in range(2):  # the first call compiles, the second records the CUDA graph
            self._worker.submit(self._warm, ids, cache).result()
        logger.info("transformers: one-stream decode step compiled in {:.1f} s", time.perf_counter() - started)
        return cache

    def _warm(self, ids: list[int], cache: Any) -> None:
        torch = self._torch
        input_ids = torch.tensor([ids], device=self.device)
        with torch.inference_mode():  # the cache's tensors are inference tensors
            cache.reset()
            self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8,
                                eos_token_id=None, do_sample=False, past_key_values=cache,
                                pad_token_id=sorted(self.eos_ids)[0])

    def generate(self, gen: Generation) -> Iterator[Piece]:
        s = gen.sampling
        alone = self._batcher is None or s.seed is not None or s.repetition_penalty != 1.0 \
            or s.frequency_penalty or s.presence_penalty or s.response_format
        with self._route:  # a lone request on a GPU: the compiled one-stream path
            if not alone and self._static_cache is not None and not self._alone_busy \
                    and not self._batcher.active and not gen.images:
                alone = True
            if alone:
                self._alone_busy += 1  # (a generator: this runs only once the stream is read)
        yield from self._generate_alone(gen) if alone else self._generate_batched(gen)

    def _generate_batched(self, gen: Generation) -> Iterator[Piece]:
        rid = f"{gen.session_id}#{next(self._ids)}"
        q = self._batcher.submit(rid, gen.prompt_ids, gen.sampling)
        gen.on_cancel(lambda: q.put(_CANCELLED))
        decoder, seen, tokens, finished = IncrementalDecoder(self.tokenizer), 0, 0, False
        hit_eos = False
        try:
            while True:
                out = q.get()
                if out is _CANCELLED:
                    return
                if out.error:
                    raise EngineError(f"generation failed: {out.error}")
                new = out.generated_tokens[seen:]
                seen = len(out.generated_tokens)
                if new and new[-1] in self.eos_ids and not gen.sampling.ignore_eos:
                    hit_eos, new = True, new[:-1]  # the end-of-turn token is not counted
                tokens += len(new)
                if new:
                    yield Piece(decoder.add(new), completion_tokens=tokens)
                if out.is_finished():
                    finished = True
                    yield Piece(decoder.flush(), completion_tokens=tokens,
                                finish_reason="stop" if hit_eos else "length")
                    return
        finally:
            self._batcher.forget(rid, cancel=not finished)

    def _generate_alone(self, gen: Generation) -> Iterator[Piece]:
        run = _Run(self.tokenizer, set() if gen.sampling.ignore_eos else self.eos_ids)
        gen.on_cancel(lambda: (run.stopped.set(), run.queue.put(_CANCELLED)))
        try:
            done = self._worker.submit(self._work, run, gen)
        except RuntimeError:  # the engine is closing
            with self._route:
                self._alone_busy -= 1
            raise BackendUnavailable("transformers: the engine is shutting down") from None
        try:
            while True:
                item = run.queue.get()
                if item is _CANCELLED:
                    break
                if item is _DONE:
                    done.result()  # it is on its last line
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
        try:
            self._work_alone(run, gen)
        finally:
            with self._route:
                self._alone_busy -= 1
            run.queue.put(_DONE)

    def _work_alone(self, run: _Run, gen: Generation) -> None:
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
        seeded = sampling.seed is not None and not sampling.greedy
        if not sampling.greedy and not seeded:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if sampling.ignore_eos:  # as the batch does: an end token neither ends the reply nor is barred
            kwargs["eos_token_id"] = None
        processors = []
        if sampling.frequency_penalty or sampling.presence_penalty:
            processors.append(_OpenAIPenalties(len(gen.prompt_ids), sampling.frequency_penalty,
                                               sampling.presence_penalty))
        try:
            if sampling.response_format:  # it masks what the penalties left
                processors.append(self._grammars.processor(sampling.response_format))
        except InvalidRequest as exc:
            run.queue.put(exc)
            return
        if seeded:  # sampled here from the request's own generator; generate() then takes it greedily
            from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            kwargs["do_sample"] = False
            processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1:
                processors.append(TopPLogitsWarper(sampling.top_p))
            processors.append(_SeededSample(sampling.seed, self.device))
        if processors:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        cache = self._static_cache
        if cache is not None and not gen.images and len(gen.prompt_ids) + sampling.max_new_tokens <= self.session_len:
            kwargs["past_key_values"] = cache
        try:
            if run.stopped.is_set():
                return
            input_ids = torch.tensor([gen.prompt_ids], device=self.device)
            if gen.images:
                pixels = self.processor.image_processor(gen.images, return_tensors="pt")["pixel_values"]
                kwargs["pixel_values"] = pixels.to(self.device, dtype=self.model.dtype)
            with torch.inference_mode():
                if "past_key_values" in kwargs:
                    cache.reset()  # the last request's keys and values
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    streamer=_Streamer(run),
                                    stopping_criteria=StoppingCriteriaList([_Stop()]), **kwargs)
        except Exception as exc:  # surfaced to the caller as a readable error
            oom = "out of memory" in str(exc).lower()
            run.queue.put(EngineError(("out of memory: " if oom else "generation failed: ") + str(exc)))

    def close(self) -> None:
        import gc

        self.cancel_all()
        if self._batcher is not None:
            self._batcher.close()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self.model = self._static_cache = self._batcher = None
        gc.collect()  # the batch and its model twin go now, not while the interpreter exits
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()


def _cuda_graph_thread_state() -> None:
    """torch < 2.13 sets up the state of compiled CUDA graphs ("cudagraph trees") only in the
    thread that first imports them; another thread's compiled call then fails an assertion
    (seen with torch 2.11: every engine after the first). Each worker sets up its own, as torch
    2.13 does by itself (its `_initialize_tls`)."""
    try:
        import torch
        from torch._inductor import cudagraph_trees as trees
    except ImportError:
        return
    if hasattr(trees, "_initialize_tls") or hasattr(trees.local, "tree_manager_containers") \
            or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    import collections

    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


def _twin(model: Any) -> Any:
    """The model's module tree again over the same weights (no memory for them): its own config
    and modules. The batch runs on the twin while `generate` runs on the model: transformers
    sets per-call values on the model's config during a forward (`is_causal`, which the batch
    turns off), so one model read by two threads at once computes wrong attention."""
    import copy

    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _bitsandbytes(bits: int, dtype: Any, on_gpu: bool) -> dict:
    """from_pretrained arguments for a 4- or 8-bit load, as XTuner's `chat --bits` makes it
    (NF4 with double quantization; LLM.int8 for 8 bits)."""
    if not on_gpu:
        raise InvalidRequest(f"bits {bits}: 4/8-bit loading (bitsandbytes) needs a CUDA GPU; on a CPU serve "
                             "the model in its own dtype (--bits 0)", param="bits")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InvalidRequest(f"bits {bits}: needs the bitsandbytes package (pip install bitsandbytes)",
                             param="bits") from None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return {"quantization_config": config}


def _tokenizer(model_path: str, trust_remote_code: bool, config: Any) -> Any:
    """The folder's tokenizer; `config` (the one the model is built with) spares AutoTokenizer
    reading config.json itself (an InternLM2 one names remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code, config=config)
    except ValueError as exc:
        if trust_remote_code or not ("trust_remote_code" in str(exc) or "does not exist" in str(exc)):
            raise
        cls = read_config(model_path, "tokenizer_config.json").get("tokenizer_class", "?")
        raise InvalidRequest(f"{model_path}: its tokenizer ({cls}) is code in the model folder, which runs only "
                             "with --trust-remote-code (the model itself loads with transformers' own classes)",
                             param="trust_remote_code") from None


def _with_adapter(model: Any, adapter_path: str, model_type: str) -> Any:
    """The model with a LoRA adapter, unmerged (PEFT); an InternLM2 adapter converted first."""
    from peft import PeftModel

    if model_type != "internlm2":
        return PeftModel.from_pretrained(model, adapter_path)
    converted = convert_internlm2_adapter(adapter_path, model.config)
    try:
        return PeftModel.from_pretrained(model, str(converted))
    finally:
        shutil.rmtree(converted, ignore_errors=True)


def _cb_options(raw: str) -> dict:
    """--transformers-cb-options: JSON of extra ContinuousBatchingConfig fields."""
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"transformers.cb_options: not JSON: {exc}", param="transformers.cb_options") from None
    if not isinstance(options, dict):
        raise InvalidRequest("transformers.cb_options: expected a JSON object of ContinuousBatchingConfig fields",
                             param="transformers.cb_options")
    return options


def _image_seq_length(config: Any) -> int:
    """Image tokens per image: LLaVA's own figure, else patches per side squared (+ CLS when
    the features keep it)."""
    n = getattr(config, "image_seq_length", None)
    if n:
        return int(n)
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


class _SeededSample:
    """The last logits processor of a seeded request: draws the next token from the processed
    distribution with the request's own generator and leaves only it (generate() runs greedy).
    The same seed gives the same reply whatever else runs: nothing shares the global RNG."""

    def __init__(self, seed: int, device: str):
        import torch

        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        token = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


class _OpenAIPenalties:
    """OpenAI's frequency and presence penalties as a transformers logits processor: each
    token's logit minus frequency x (times generated so far) and presence x (generated at all),
    counting the reply only (not the prompt), as OpenAI defines them."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        reply = input_ids[:, self.prompt_len:]
        if reply.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, reply, torch.ones_like(reply, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class _Grammars:
    """response_format -> an xgrammar logits processor (the library LMDeploy's guided decoding
    uses too): JSON, or JSON valid against a schema, whatever the model would have said.
    Compiled grammars are cached by schema; the tokenizer's table is built on first use."""

    def __init__(self, tokenizer: Any, config: Any, eos_ids: set[int]):
        self.tokenizer, self.config, self.eos_ids = tokenizer, config, eos_ids
        self._compiler = None
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def processor(self, response_format: dict) -> Any:
        try:
            import xgrammar as xgr
            import xgrammar.contrib.hf as xgr_hf
        except ImportError:
            raise InvalidRequest("response_format: constrained decoding needs the xgrammar package "
                                 "(pip install xgrammar)", param="response_format") from None
        key = json.dumps(response_format, sort_keys=True)
        with self._lock:  # the tokenizer's table once; the cache (a compile runs outside the lock)
            if self._compiler is None:
                text_config = getattr(self.config, "text_config", None) or self.config
                vocab = getattr(text_config, "vocab_size", None) or len(self.tokenizer)
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=vocab,
                                                          stop_token_ids=sorted(self.eos_ids))
                self._compiler = xgr.GrammarCompiler(info)
                # Compact JSON never holds a raw control character (in a string it must be
                # escaped); xgrammar 0.2.9 lets one through in strings with maxLength.
                self._control = [i for i, b in enumerate(info.decoded_vocab)
                                 if any(c < 0x20 for c in b)]
            compiled, compiler = self._cache.get(key), self._compiler
        if compiled is None:  # one client's big schema does not hold up another client's request
            try:
                # json_object: any JSON object, as OpenAI and LMDeploy define it; compact
                # (no free whitespace), so a weak model cannot spend its tokens on blanks
                compiled = compiler.compile_json_schema(json.dumps(response_schema(response_format)),
                                                        any_whitespace=False)
            except Exception as exc:  # xgrammar's own message says what is wrong
                raise InvalidRequest(f"response_format: the schema cannot be used: {clean_error(exc)}",
                                     param="response_format") from None
            with self._lock:
                if len(self._cache) >= 64:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = compiled
        return _NoControlBytes(xgr_hf.LogitsProcessor(compiled), self._control)


class _NoControlBytes:
    """A grammar's logits processor, then tokens holding control bytes masked out."""

    def __init__(self, inner: Any, banned: list[int]):
        self.inner, self.banned = inner, banned

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        scores = self.inner(input_ids, scores)
        if self.banned:
            scores[:, self.banned] = float("-inf")
        return scores
