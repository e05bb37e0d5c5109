"""Remote OpenAI-compatible backend (LMDeploy api_server, vLLM, OpenAI, our own server).

Retries with exponential backoff happen only on connection errors and 5xx answers before the
first token arrives; 400/401/404 become clear errors at once. Cancel closes the HTTP stream.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Iterator

from .base import Engine, Generation, Message, Piece
from .errors import (AuthenticationFailed, BackendUnavailable, EngineError, InvalidRequest,
                     ModelNotFound)
from .prompts import ChatPrompt, escape_control_tokens
from .settings import EngineSettings, SamplingParams

# Control tokens of the chat templates commonly served (InternLM2, Qwen, Llama 3, Llama 2).
COMMON_CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|action_start|>",
                         "<|action_end|>", "<|interpreter|>", "<|plugin|>", "<|begin_of_text|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>",
                         "[INST]", "[/INST]")


class ApiEngine(Engine):
    # passed through to the remote server, which refuses what it cannot do
    features = frozenset({"frequency_penalty", "presence_penalty", "response_format"})

    def __init__(self, settings: EngineSettings):
        from openai import OpenAI

        super().__init__()
        self.settings = settings.api
        self.client = OpenAI(base_url=self.settings.base_url, api_key=self.settings.api_key or "EMPTY",
                             timeout=self.settings.timeout, max_retries=0)
        self._model = self.settings.model
        self.max_concurrency = 128  # the remote server batches; it answers 5xx when full
        self.accepts_images = self.settings.images  # relayed as image_url parts (/v1/models cannot tell)
        if self.settings.tokenizer:  # the remote model's own tokenizer here: requests are fitted before they go
            self.prompt = ChatPrompt.from_pretrained(self.settings.tokenizer, settings.chat_template)
            self.session_len = settings.session_len

    @property
    def model_name(self) -> str:
        if not self._model:  # resolved on first use, so a server that starts later is fine
            models = self._call(lambda: self.client.models.list(), threading.Event()).data
            if not models:
                raise ModelNotFound(f"api: {self.settings.base_url} lists no models")
            self._model = models[0].id
        return self._model

    def health(self) -> str:
        try:  # one quick look, no retries: this runs while a page loads
            self.client.with_options(timeout=3.0, max_retries=0).models.list()
            return ""
        except Exception as exc:
            return f"api: {self.settings.base_url} does not answer: {_describe(exc)}"

    # -- requests ---------------------------------------------------------------------
    def _request(self, messages: list[Message], sampling: SamplingParams) -> dict:
        messages = [self._wire(m) for m in messages]
        req: dict[str, Any] = dict(model=self.model_name, messages=messages, stream=True,
                                   stream_options={"include_usage": True},
                                   max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                   top_p=sampling.top_p)
        if sampling.stop:
            req["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            req["seed"] = sampling.seed
        for name in ("frequency_penalty", "presence_penalty", "response_format"):  # OpenAI's own fields
            if getattr(sampling, name):
                req[name] = getattr(sampling, name)
        # vLLM, LMDeploy and our server accept these extensions; OpenAI itself does not.
        extra = {"top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty}
        if sampling.ignore_eos:
            extra["ignore_eos"] = True
        req["extra_body"] = extra
        return req

    def _wire(self, m: Message) -> dict:
        """A checked message as it goes to the remote server: images back as image_url parts."""
        content = m["content"]
        if self.settings.escape_control_tokens:
            content = escape_control_tokens(content, COMMON_CONTROL_TOKENS)
        if not m.get("image_urls"):
            return {"role": m["role"], "content": content}
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in m["image_urls"]]
        return {"role": m["role"], "content": parts + ([{"type": "text", "text": content}] if content else [])}

    def _call(self, fn: Any, cancelled: threading.Event) -> Any:
        """Run fn with retries on connection errors / 5xx; map errors to EngineError."""
        import openai

        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            try:
                return fn()
            except (openai.APIConnectionError, openai.InternalServerError, _Unanswered) as exc:
                if attempt + 1 == attempts or cancelled.is_set():
                    raise BackendUnavailable(
                        f"api: {self.settings.base_url} failed after {attempt + 1} attempt(s): "
                        f"{_describe(exc)}") from None
                if cancelled.wait(min(0.5 * 2 ** attempt, 8.0)):
                    raise BackendUnavailable("api: cancelled while retrying") from None
            except openai.APIStatusError as exc:
                raise _map_status(exc, self.settings.base_url) from None

    def generate(self, gen: Generation) -> Iterator[Piece]:
        import openai

        req = self._request(gen.messages, gen.sampling)
        if gen.continue_final:  # vLLM's names for it; our server takes them too
            req["extra_body"].update(continue_final_message=True, add_generation_prompt=False)
        streams: list = []

        def close_streams() -> None:
            for stream in streams:
                stream.close()  # unblocks the reading thread at once

        gen.on_cancel(close_streams)

        def open_and_read_first() -> tuple[Any, list]:
            # Retried as a whole: a failure before the first token loses nothing.
            stream = self.client.chat.completions.create(**req)
            streams.append(stream)
            if gen.cancelled.is_set():
                stream.close()
            head = []
            for chunk in stream:
                head.append(chunk)
                if _content(chunk) or _finish(chunk) or chunk.usage:
                    break
            else:
                if not gen.cancelled.is_set():
                    raise _Unanswered("the server ended the stream without an answer")
            return stream, head

        stream = None
        try:
            try:
                stream, head = self._call(open_and_read_first, gen.cancelled)
                finish, usage, pieces = None, None, 0
                for chunk in itertools.chain(head, stream):
                    text = _content(chunk)
                    pieces += bool(text)
                    finish = _finish(chunk) or finish
                    usage = chunk.usage or usage
                    yield Piece(text, completion_tokens=pieces)
            except openai.APIError as exc:
                if not gen.cancelled.is_set():
                    raise EngineError(f"api: stream failed: {_describe(exc)}") from None
                return
            except EngineError:
                if gen.cancelled.is_set():  # e.g. cancelled while waiting to retry
                    return
                raise
            except Exception as exc:  # the connection closed under us
                if not gen.cancelled.is_set():
                    raise BackendUnavailable(f"api: stream broke off: {exc}") from None
                return
            if finish is None and not gen.cancelled.is_set():
                # a stream that stops without saying why was cut (e.g. the replica behind a proxy died)
                raise BackendUnavailable(f"api: the reply was cut off after {pieces} piece(s): {self.settings.base_url} "
                                         "ended the stream before the reply's end")
            if usage is not None:
                yield Piece("", completion_tokens=usage.completion_tokens,
                            prompt_tokens=usage.prompt_tokens, finish_reason=finish)
            else:
                yield Piece("", finish_reason=finish)
        finally:
            close_streams()

    def close(self) -> None:
        self.cancel_all()
        self.client.close()


class _Unanswered(Exception):
    """A stream that ended before its first token: retried like a failed connection. LMDeploy's
    proxy says it this way when the replica it chose is gone (its error object, in-band, is no
    SSE event)."""


def _content(chunk: Any) -> str:
    return (chunk.choices[0].delta.content or "") if chunk.choices else ""


def _finish(chunk: Any) -> str | None:
    return chunk.choices[0].finish_reason if chunk.choices else None


def _describe(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc) or type(exc).__name__


def _map_status(exc: Any, base_url: str) -> EngineError:
    msg = _describe(exc)
    status = getattr(exc, "status_code", None)
    param = None
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error", body), dict):
        param = body.get("error", body).get("param")
    if status == 400 or status == 422:
        return InvalidRequest(f"api: request rejected: {msg}", param=param)
    if status in (401, 403):
        return AuthenticationFailed(f"api: {base_url} refused the API key ({status}): {msg}")
    if status == 404:
        return ModelNotFound(f"api: not found at {base_url} (404): {msg}")
    return BackendUnavailable(f"api: {base_url} answered {status}: {msg}")
