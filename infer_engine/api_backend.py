"""Remote OpenAI-compatible backend (LMDeploy api_server, vLLM, OpenAI, our own server).

Retries with exponential backoff happen only on connection errors and 5xx answers before the
first token arrives; 400/401/404 become clear errors at once. Cancel closes the HTTP stream.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator, Sequence

from .base import Delta, Engine, Message, SessionRegistry, UsageMeter, check_messages
from .errors import (AuthenticationFailed, BackendUnavailable, EngineError, InvalidRequest,
                     ModelNotFound)
from .prompts import escape_control_tokens
from .settings import EngineSettings, SamplingParams

# Control tokens of the chat templates commonly served (InternLM2, Qwen, Llama 3, Llama 2).
COMMON_CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|action_start|>",
                         "<|action_end|>", "<|interpreter|>", "<|plugin|>", "<|begin_of_text|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>",
                         "[INST]", "[/INST]")


class _Session:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.stream: Any = None


class ApiEngine(Engine):
    def __init__(self, settings: EngineSettings):
        from openai import OpenAI

        self.settings = settings.api
        self.client = OpenAI(base_url=self.settings.base_url, api_key=self.settings.api_key or "EMPTY",
                             timeout=self.settings.timeout, max_retries=0)
        self._model = self.settings.model
        self._sessions: SessionRegistry[_Session] = SessionRegistry()

    @property
    def model_name(self) -> str:
        if not self._model:  # resolved on first use, so a server that starts later is fine
            models = self._call(lambda: self.client.models.list(), _Session()).data
            if not models:
                raise ModelNotFound(f"api: {self.settings.base_url} lists no models")
            self._model = models[0].id
        return self._model

    # -- requests ---------------------------------------------------------------------
    def _request(self, messages: list[Message], sampling: SamplingParams) -> dict:
        if self.settings.escape_control_tokens:
            messages = [{"role": m["role"], "content": escape_control_tokens(m["content"],
                                                                             COMMON_CONTROL_TOKENS)}
                        for m in messages]
        req: dict[str, Any] = dict(model=self.model_name, messages=messages, stream=True,
                                   stream_options={"include_usage": True},
                                   max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                   top_p=sampling.top_p)
        if sampling.stop:
            req["stop"] = list(sampling.stop)
        if sampling.seed is not None:
            req["seed"] = sampling.seed
        # vLLM, LMDeploy and our server accept these extensions; OpenAI itself does not.
        extra = {"top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty}
        if sampling.ignore_eos:
            extra["ignore_eos"] = True
        req["extra_body"] = extra
        return req

    def _call(self, fn: Any, session: _Session) -> Any:
        """Run fn with retries on connection errors / 5xx; map errors to EngineError."""
        import openai

        attempts = self.settings.max_retries + 1
        for attempt in range(attempts):
            try:
                return fn()
            except (openai.APIConnectionError, openai.InternalServerError) as exc:
                if attempt + 1 == attempts or session.cancelled.is_set():
                    raise BackendUnavailable(
                        f"api: {self.settings.base_url} failed after {attempt + 1} attempt(s): "
                        f"{_describe(exc)}") from None
                if session.cancelled.wait(min(0.5 * 2 ** attempt, 8.0)):
                    raise BackendUnavailable("api: cancelled while retrying") from None
            except openai.APIStatusError as exc:
                raise _map_status(exc, self.settings.base_url) from None

    def stream_chat(self, messages: Sequence[Message], sampling: SamplingParams | None = None,
                    session_id: str = "default") -> Iterator[Delta]:
        sampling = (sampling or SamplingParams()).validate()
        req = self._request(check_messages(messages), sampling)
        session = self._sessions.add(session_id, _Session())
        try:
            meter = UsageMeter()

            def open_and_read_first() -> tuple[Any, list]:
                # Retried as a whole: a failure before the first token loses nothing.
                session.stream = self.client.chat.completions.create(**req)
                head = []
                for chunk in session.stream:
                    head.append(chunk)
                    if _content(chunk) or _finish(chunk) or chunk.usage:
                        break
                return session.stream, head

            stream, head = self._call(open_and_read_first, session)
        except BaseException:
            self._sessions.remove(session_id, session)
            raise
        return self._consume(stream, head, session, session_id, meter)

    def _consume(self, stream: Any, head: list, session: _Session, session_id: str,
                 meter: UsageMeter) -> Iterator[Delta]:
        import openai

        finish, server_usage, pieces = "stop", None, 0

        def chunks() -> Iterator:
            yield from head
            yield from stream

        try:
            try:
                for chunk in chunks():
                    text = _content(chunk)
                    if text:
                        pieces += 1
                        meter.tokens_out(pieces)
                        yield Delta(text)
                    finish = _finish(chunk) or finish
                    server_usage = chunk.usage or server_usage
            except openai.APIError as exc:
                if not session.cancelled.is_set():
                    raise EngineError(f"api: stream failed: {_describe(exc)}") from None
            except Exception as exc:  # the connection closed under us
                if not session.cancelled.is_set():
                    raise BackendUnavailable(f"api: stream broke off: {exc}") from None
            if server_usage is not None:
                meter.prompt_tokens = server_usage.prompt_tokens
                meter.tokens = server_usage.completion_tokens
            yield Delta("", meter.usage("cancelled" if session.cancelled.is_set() else finish))
        finally:
            session.cancelled.set()
            stream.close()
            self._sessions.remove(session_id, session)

    def cancel(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        if session is None:
            return False
        session.cancelled.set()
        if session.stream is not None:
            try:
                session.stream.close()  # unblocks the reading thread at once
            except Exception:
                pass
        return True

    def close(self) -> None:
        for sid, _ in self._sessions.items():
            self.cancel(sid)
        self.client.close()


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
