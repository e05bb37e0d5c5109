"""The one interface every backend implements; the UI and the server use only this module."""
from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field
from typing import Generic, Iterator, Sequence, TypeVar

from .errors import InvalidRequest
from .settings import SamplingParams

ROLES = ("system", "user", "assistant")
Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None          # request start -> first text
    decode_tokens_per_s: float | None = None  # tokens after the first / time after the first
    finish_reason: str = "stop"          # stop | length | cancelled

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """A piece of streamed text; the last item of a stream has `usage` set (and may be empty)."""

    text: str
    usage: Usage | None = None


@dataclass
class UsageMeter:
    """Times a generation as it streams; backends feed it token counts."""

    prompt_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    tokens_at_first: int = 0

    def tokens_out(self, total_completion_tokens: int) -> None:
        now = time.perf_counter()
        if self.first is None and total_completion_tokens > 0:
            self.first, self.tokens_at_first = now, total_completion_tokens
        self.last = now
        self.tokens = total_completion_tokens

    def usage(self, finish_reason: str) -> Usage:
        ttft = None if self.first is None else self.first - self.start
        tps = None
        if self.first is not None and self.last is not None and self.last > self.first:
            tps = (self.tokens - self.tokens_at_first) / (self.last - self.first)
        return Usage(self.prompt_tokens, self.tokens, ttft, tps, finish_reason)


class StopStringFilter:
    """Cuts streamed text at the first stop string, holding back text that may start one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stop:
            return text
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.buffer.endswith(s[:k])),
                   default=0)
        out = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


T = TypeVar("T")


class SessionRegistry(Generic[T]):
    """The running generation of each session id (one at a time per session), thread-safe."""

    def __init__(self) -> None:
        self._items: dict[str, T] = {}
        self._lock = threading.Lock()

    def ensure_free(self, session_id: str) -> None:
        if session_id in self._items:
            raise InvalidRequest(f"session {session_id!r} already has a running generation",
                                 param="session_id")

    def add(self, session_id: str, item: T) -> T:
        with self._lock:
            self.ensure_free(session_id)
            self._items[session_id] = item
        return item

    def get(self, session_id: str) -> T | None:
        with self._lock:
            return self._items.get(session_id)

    def remove(self, session_id: str, item: T) -> None:
        """Forget `item` (not a newer generation that reused the session id)."""
        with self._lock:
            if self._items.get(session_id) is item:
                del self._items[session_id]

    def items(self) -> list[tuple[str, T]]:
        with self._lock:
            return list(self._items.items())

    def __len__(self) -> int:
        return len(self._items)


def check_messages(messages: Sequence[Message]) -> list[Message]:
    """Validate an OpenAI-style message list; flatten list-of-parts content to text."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object with role and content", param=where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                                 param=f"{where}.role")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise InvalidRequest(f"{where}.content: only text parts are supported",
                                     param=f"{where}.content")
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string", param=f"{where}.content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise InvalidRequest("the last message must have role 'user'", param=f"messages[{len(out) - 1}].role")
    return out


class Engine(abc.ABC):
    """A chat model behind one interface. Implementations must be safe to call from many threads."""

    model_name: str = "model"

    @abc.abstractmethod
    def stream_chat(self, messages: Sequence[Message], sampling: SamplingParams | None = None,
                    session_id: str = "default") -> Iterator[Delta]:
        """Yield text deltas; the last Delta carries Usage. Raises EngineError subclasses."""

    def chat(self, messages: Sequence[Message], sampling: SamplingParams | None = None,
             session_id: str = "default") -> tuple[str, Usage]:
        parts, usage = [], Usage()
        for delta in self.stream_chat(messages, sampling, session_id):
            parts.append(delta.text)
            usage = delta.usage or usage
        return "".join(parts), usage

    @abc.abstractmethod
    def cancel(self, session_id: str) -> bool:
        """Stop the session's running generation; True if one was running."""

    def close(self) -> None:
        """Release the model / connections."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
