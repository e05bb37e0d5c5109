"""A model-free engine for the app's tests and load benchmarks: it answers every question with
a fixed-shape reply at a fixed pace, so what is measured or asserted is the app and the server,
never a model's sampling.

    python app.py --backend synthetic --synthetic-tokens-per-s 100 --synthetic-reply-tokens 150

The reply echoes the last user message ("You said: ...", and "(N images)" when it came with
images, which it takes with `accepts_images`), then, with `reply_tokens`, goes on
with numbered filler words up to that many tokens (a token is one word here). It honours
max_new_tokens, stop strings, ignore_eos and cancel like every backend (the protocol is
Engine's); it has no context window (nothing is tokenized).

`cpu_ms_per_token` makes every token cost that much pure-Python work on the stream's thread
(holding the GIL, as LMDeploy's engine loop and detokenizer do in the app's process): the app's
load benchmark on a CPU then meets the contention a GPU engine brings (scripts/bench_app.py).
"""
from __future__ import annotations

import time
from typing import Iterator

from .base import Engine, Generation, Piece
from .settings import EngineSettings


class SyntheticEngine(Engine):
    def __init__(self, settings: EngineSettings | None = None):
        super().__init__()
        self.settings = (settings or EngineSettings(backend="synthetic")).synthetic
        self.model_name = self.settings.model_name
        self.accepts_images = self.settings.accepts_images
        self.max_concurrency = 1024  # no model: any number of streams

    def reply_words(self, gen: Generation) -> Iterator[str]:
        """The whole reply to the last question; continuing a reply, what comes after it."""
        asked = gen.messages[-2 if gen.continue_final else -1]
        done = len(gen.messages[-1]["content"].split()) if gen.continue_final else 0
        words = ["You", " said:"] + [" " + w for w in asked["content"].split()]
        if asked.get("images"):
            words += [f" ({len(asked['images'])}", " images)" if len(asked["images"]) > 1 else " image)"]
        target = self.settings.reply_tokens
        if gen.sampling.ignore_eos:
            target = done + gen.sampling.max_new_tokens
        words += [f" w{n}" for n in range(len(words) + 1, target + 1)]
        yield from words[done:]

    def generate(self, gen: Generation) -> Iterator[Piece]:
        tps, limit = self.settings.tokens_per_s, gen.sampling.max_new_tokens
        start, count = time.perf_counter(), 0
        yield Piece("", prompt_tokens=sum(len(m["content"].split()) for m in gen.messages))
        for word in self.reply_words(gen):
            if count == limit:
                yield Piece("", completion_tokens=count, finish_reason="length")
                return
            if tps > 0:  # token i is due at start + i / tps: no drift, whatever the load
                delay = start + (count + 1) / tps - time.perf_counter()
                if delay > 0 and gen.cancelled.wait(delay):
                    return
            elif gen.cancelled.is_set():
                return
            if self.settings.cpu_ms_per_token > 0:
                _burn(self.settings.cpu_ms_per_token / 1000)
            count += 1
            yield Piece(word, completion_tokens=count)
        yield Piece("", completion_tokens=count, finish_reason="stop")


def _burn(seconds: float) -> None:
    """Busy Python bytecode for `seconds` of this thread's CPU time (the GIL held, released only at
    the interpreter's switch interval, as any pure-Python loop does)."""
    end = time.thread_time() + seconds
    n = 0
    while time.thread_time() < end:
        for _ in range(200):
            n += 1
