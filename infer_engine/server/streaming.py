"""A started request answered: collected into one completion, or streamed as OpenAI's SSE
chunks; usage, timings and the log line."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse
from loguru import logger

from ..aio import ThreadedStream
from ..base import Delta, Usage
from ..errors import EngineError
from ..protocol import error_body
from .context import Call, ServerContext, watching


def usage_json(usages: list[Usage]) -> dict:
    """OpenAI's usage, exactly its fields: the prompt once, the completions of all choices."""
    prompt, completion = usages[0].prompt_tokens, sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def timings_json(u: Usage) -> dict:
    """Our timing figures (first choice), beside usage rather than in it (llama.cpp's place)."""
    return {"ttft_s": u.ttft_s, "decode_tokens_per_s": u.decode_tokens_per_s}


def log_done(path: str, session_id: str, status: int, usage: Usage | None, stream: bool, note: str = "") -> None:
    if usage is None:
        logger.info("POST {} {} session={} stream={} {}", path, status, session_id[:12], stream, note)
        return
    ttft = "-" if usage.ttft_s is None else f"{usage.ttft_s * 1000:.0f}ms"
    logger.info("POST {} {} session={} stream={} prompt_tokens={} completion_tokens={} "
                "ttft={} finish={} {}", path, status, session_id[:12], stream, usage.prompt_tokens,
                usage.completion_tokens, ttft, usage.finish_reason, note)


async def _collect(stream: ThreadedStream, first: list[Delta]) -> tuple[str, Usage]:
    parts, usage, items = [], Usage(), first
    while items:
        for delta in items:
            parts.append(delta.text)
            usage = delta.usage or usage
        items = await stream.take()
    return "".join(parts), usage


async def complete(server: ServerContext, call: Call, cid: str, created: int, request: Request) -> Any:
    engine = server.engine
    try:
        done = await watching(request, lambda: call.cancel(engine), asyncio.gather(
            *(_collect(s, f) for s, f in zip(call.streams, call.firsts))))
        call.done()
    except EngineError as exc:
        call.done()
        call.cancel(engine)
        log_done(call.path, call.sessions[0], exc.status, None, False, f"error={exc.message!r}")
        return JSONResponse(error_body(exc), status_code=exc.status)
    usages = [u for _, u in done]
    log_done(call.path, call.sessions[0], 200, usages[0], False)
    if call.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": u.finish_reason} for i, (text, u) in enumerate(done)]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": u.finish_reason}
                   for i, (text, u) in enumerate(done)]
    return {"id": cid, "object": call.obj, "created": created, "model": server.name, "choices": choices,
            "usage": usage_json(usages), "timings": timings_json(usages[0])}


async def sse(server: ServerContext, call: Call, cid: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """One chunk per batch of deltas of a choice: what arrived since the last chunk goes out
    together (when the loop is busy, and at most every `stream_interval_s` when set). Each choice
    ends with one chunk carrying its finish_reason; usage (if asked) and [DONE] come after all of
    them, errors included."""
    engine, name, interval = server.engine, server.name, server.stream_interval_s
    obj = f"{call.obj}.chunk" if call.chat else call.obj
    loop = asyncio.get_running_loop()

    def chunk(i: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if call.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"id": cid, "object": obj, "created": created, "model": name, "choices": [choice]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        stream, items, usage = call.streams[i], call.firsts[i], None
        try:
            while items:
                await queue.put((i, items, None))
                usage = next((d.usage for d in reversed(items) if d.usage), usage)
                if interval:  # what comes meanwhile waits for the next chunk (the end does not)
                    await stream.wait_end(interval)
                items = await stream.take()
            await queue.put((i, None, usage or Usage()))
        except EngineError as exc:
            await queue.put((i, exc, None))

    usages: list[Usage | None] = [None] * len(call.streams)
    tasks = [loop.create_task(pump(i)) for i in range(len(call.streams))]
    finished, failed = False, None
    try:
        if call.chat:
            for i in range(len(call.streams)):
                yield chunk(i, None, role=True)
        left = len(call.streams)
        while left:
            i, items, usage = await queue.get()
            if isinstance(items, EngineError):  # a generation failed mid-stream: say so, end it
                failed, left = items, left - 1
                call.cancel(engine)
                continue
            if items is None:
                usages[i], left = usage, left - 1
                yield chunk(i, None, usage.finish_reason)
                continue
            text = "".join(d.text for d in items)
            if text:
                yield chunk(i, text)
        if failed is not None:
            yield f"data: {json.dumps(error_body(failed))}\n\n"
        elif include_usage:
            done = [u or Usage() for u in usages]
            body = {"id": cid, "object": obj, "created": created, "model": name, "choices": [],
                    "usage": usage_json(done), "timings": timings_json(done[0])}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
        finished = True
        log_done(call.path, call.sessions[0], 200, usages[0], True, f"error={failed.message!r}" if failed else "")
    finally:
        for task in tasks:
            task.cancel()
        call.done()
        if not finished:  # the client went away: the streams' threads then drain them
            call.cancel(engine)
            log_done(call.path, call.sessions[0], 200, usages[0], True, "client disconnected")
