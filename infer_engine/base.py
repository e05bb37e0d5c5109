"""The one interface every backend implements; the UI and the server use only this module.

`Engine` owns the protocol once: it validates the request, fits the conversation to the
context, registers the session on the first `next()` (so a stream that is never read holds
nothing), cuts at stop strings, works out the finish reason and the usage, and unregisters in
`finally`. A backend writes one method, `generate`, yielding `Piece`s of new text, and may
hook `cancel` through `Generation.on_cancel` (as simonw/llm's `Model.execute` does).
"""
from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from .errors import ContextOverflow, InvalidRequest, SessionBusy
from .images import MAX_IMAGES_PER_REQUEST, load_image
from .settings import SamplingParams, check_text

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
class Piece:
    """What a backend's `generate` yields: new text, and what it knows so far."""

    text: str = ""
    completion_tokens: int | None = None  # running total, when the backend counts tokens
    prompt_tokens: int | None = None      # when the backend learns it (remote servers)
    finish_reason: str | None = None      # "stop" (end of turn) or "length", when it knows


@dataclass
class UsageMeter:
    """Times a generation as it streams; the engine feeds it token counts."""

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


def _prefix_function(s: str) -> list[int]:
    """KMP failure table: pi[i] = length of the longest proper prefix of s[:i+1] that is also
    its suffix."""
    pi = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = pi[k - 1]
        if s[i] == s[k]:
            k += 1
        pi[i] = k
    return pi


class StopStringFilter:
    """Cuts streamed text at the first stop string, holding back text that may start one.

    Each stop string is matched by a KMP automaton whose state carries across `feed` calls,
    so the work is linear in the text (amortised O(1) per character and stop string) however
    long the stop strings are; the text held back is never longer than the longest of them.
    The match that ends first wins, so the cut does not depend on how the text was chunked.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in dict.fromkeys(stop) if s]
        self._fail = [_prefix_function(s) for s in self.stop]
        self._state = [0] * len(self.stop)  # characters of each stop string matched so far
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stop:
            return text
        start = len(self.buffer)
        self.buffer += text
        state, stops, fail = self._state, self.stop, self._fail
        for pos in range(start, len(self.buffer)):
            ch = self.buffer[pos]
            cut = -1
            for i, s in enumerate(stops):
                q = state[i]
                while q and s[q] != ch:
                    q = fail[i][q - 1]
                if s[q] == ch:
                    q += 1
                if q == len(s):
                    begin = pos + 1 - q
                    cut = begin if cut < 0 else min(cut, begin)
                    q = fail[i][q - 1]
                state[i] = q
            if cut >= 0:
                self.stopped = True
                out, self.buffer = self.buffer[:cut], ""
                return out
        hold = max(state)
        out = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


class _TrailingReplacementHold:
    """Holds back U+FFFD at the end of the text so far: a stream cut at max_new_tokens in the
    middle of a multi-byte character must not end in a replacement character. A reply that
    ended otherwise (its end of turn, a stop string a remote server cut at) keeps what the
    model wrote, invalid bytes included, as the same reply read whole does."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str) -> str:
        text = self.held + text
        kept = text.rstrip("\ufffd")
        self.held = text[len(kept):]
        return kept

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


T = TypeVar("T")


class SessionRegistry(Generic[T]):
    """The running generation of each session id (one at a time per session), thread-safe."""

    def __init__(self) -> None:
        self._items: dict[str, T] = {}
        self._changed = threading.Condition()

    def add(self, session_id: str, item: T) -> T:
        with self._changed:
            if session_id in self._items:
                raise SessionBusy("this session already has a reply being generated: wait for it "
                                  "to finish or cancel it", param="session_id")
            self._items[session_id] = item
        return item

    def get(self, session_id: str) -> T | None:
        with self._changed:
            return self._items.get(session_id)

    def remove(self, session_id: str, item: T) -> None:
        """Forget `item` (not a newer generation that reused the session id)."""
        with self._changed:
            if self._items.get(session_id) is item:
                del self._items[session_id]
                self._changed.notify_all()

    def wait_free(self, session_id: str, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: session_id not in self._items, timeout)

    def items(self) -> list[tuple[str, T]]:
        with self._changed:
            return list(self._items.items())

    def __len__(self) -> int:
        return len(self._items)


ROLE_ALIASES = {"developer": "system"}  # what OpenAI's newer clients send for system


def check_messages(messages: Sequence[Message], continue_final: bool = False) -> list[Message]:
    """Validate an OpenAI-style message list; flatten list-of-parts content to text; the
    `developer` role is the system role. Any conversation is taken: system only, ending with
    a user message, or ending with a reply (a new reply follows it; with continue_final the
    model goes on with that reply instead)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object with role and content", param=where)
        role, content = m.get("role"), m.get("content")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)} or developer, got {role!r}",
                                 param=f"{where}.role")
        images, urls = _kept_images(m, where)
        if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url", ...}]
            texts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    spec = part.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    images.append(load_image(url, f"{at}.image_url"))
                    urls.append(url)
                else:
                    raise InvalidRequest(f"{at}: expected a text or image_url part", param=at)
            content = "".join(texts)
        msg = {"role": role, "content": check_text(content, f"{where}.content")}
        if images:
            if role != "user":
                raise InvalidRequest(f"{where}.content: images go in user messages", param=f"{where}.content")
            msg["images"], msg["image_urls"] = images, urls
        out.append(msg)
    if sum(len(m.get("images", ())) for m in out) > MAX_IMAGES_PER_REQUEST:
        raise InvalidRequest(f"messages: at most {MAX_IMAGES_PER_REQUEST} images in one request", param="messages")
    if continue_final and out[-1]["role"] != "assistant":
        raise InvalidRequest("continuing the final message needs an assistant message last, got "
                             f"{out[-1]['role']!r}", param=f"messages[{len(out) - 1}].role")
    return out


def _kept_images(m: dict, where: str) -> tuple[list, list]:
    """Images of a message checked before (check_messages runs again inside the engine)."""
    images = m.get("images")
    if images is None:
        return [], []
    from PIL import Image

    if not isinstance(images, list) or not all(isinstance(im, Image.Image) for im in images):
        raise InvalidRequest(f"{where}.images: not a message field; send images as image_url content parts",
                             param=f"{where}.images")
    return list(images), list(m.get("image_urls") or [""] * len(images))


class Generation:
    """One request as a backend's `generate` sees it: validated messages, fitted to the
    context, their token ids (backends with a local tokenizer), the sampling settings, and a
    cancellation flag with callbacks (abort an engine session, close an HTTP stream)."""

    def __init__(self, session_id: str, messages: list[Message], prompt_ids: list[int] | None,
                 sampling: SamplingParams, continue_final: bool = False):
        self.session_id, self.messages, self.prompt_ids, self.sampling = \
            session_id, messages, prompt_ids, sampling
        self.continue_final = continue_final  # the last message is a reply to go on with
        self.raw_prompt: str | None = None    # a plain completion: this text, no chat template
        self.images = [im for m in messages for im in m.get("images", ())]  # in prompt order
        self.cancelled = threading.Event()
        self.streamed = False  # a request is streamed once
        self._callbacks: list[Callable[[], Any]] = []
        self._lock = threading.Lock()

    def on_cancel(self, fn: Callable[[], Any]) -> None:
        """Call `fn` when the generation is cancelled (at once if it already is)."""
        with self._lock:
            if not self.cancelled.is_set():
                self._callbacks.append(fn)
                return
        _quietly(fn)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _quietly(fn)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # a cancel hook must not turn a Stop into an error
        pass


class Engine(abc.ABC):
    """A chat model behind one interface. Implementations must be safe to call from many threads.

    Backends set `prompt` (a ChatPrompt) and `session_len` when they tokenize locally; then the
    conversation is cut to the context here. Remote backends leave `prompt` None.
    """

    model_name: str = "model"
    prompt: Any = None
    session_len: int = 0
    max_concurrency: int = 1  # generations it runs at once (what the app lets run together)
    # what it honours beyond the common sampling settings: "frequency_penalty",
    # "presence_penalty", "response_format" (constrained JSON), "completions" (a plain prompt,
    # not a conversation); a request for
    # anything else is refused naming the field, never silently ignored
    features: frozenset[str] = frozenset()
    accepts_images: bool = False  # image_url parts in user messages (a vision-language model)

    def __init__(self) -> None:
        self._sessions: SessionRegistry[Generation] = SessionRegistry()

    @abc.abstractmethod
    def generate(self, gen: Generation) -> Iterator[Piece]:
        """Yield the reply as Pieces. Stop when `gen.cancelled` is set or when closed (clean up
        in `finally`). Raise EngineError subclasses for failures."""

    def stream_chat(self, messages: Sequence[Message], sampling: SamplingParams | None = None,
                    session_id: str = "default", continue_final: bool = False) -> Iterator[Delta]:
        """Yield text deltas; the last Delta carries Usage. Bad input raises EngineError
        subclasses here, at the call; the session is taken on the first `next()`. With
        continue_final the last message is an assistant reply that the model goes on with
        (the deltas are what it adds)."""
        return self._stream(self._prepare(messages, sampling, session_id, continue_final))

    def check(self, messages: Sequence[Message], sampling: SamplingParams | None = None,
              continue_final: bool = False) -> None:
        """Raise what `stream_chat` would raise for this request (bad input, too long for the
        context) without generating anything."""
        self.prepare(messages, sampling, continue_final)

    def prepare(self, messages: Sequence[Message], sampling: SamplingParams | None = None,
                continue_final: bool = False) -> Generation:
        """The request checked and fitted to the context once (raises what `stream_chat` would):
        a caller that must know a request is accepted before it commits to it (the chat page
        saves the question only then) streams this same request with `stream_prepared`."""
        return self._prepare(messages, sampling, "", continue_final)

    def stream_prepared(self, gen: Generation, session_id: str = "default") -> Iterator[Delta]:
        """Stream a request from `prepare` (once) as `stream_chat` streams a new one."""
        if gen.streamed:
            raise ValueError("a prepared request streams once")
        gen.session_id = session_id
        return self._stream(gen)

    def _prepare(self, messages: Sequence[Message], sampling: SamplingParams | None,
                 session_id: str, continue_final: bool = False) -> Generation:
        sampling = self.check_features((sampling or SamplingParams()).validate())
        msgs = check_messages(messages, continue_final)
        if not self.accepts_images:
            for i, m in enumerate(msgs):
                if m.get("images"):
                    raise InvalidRequest(f"messages[{i}].content: this model ({self.model_name}) takes no images, "
                                         "only text", param=f"messages[{i}].content")
        ids = None
        if self.prompt is not None:
            msgs, ids = self.prompt.fit(msgs, self.session_len, sampling.max_new_tokens, continue_final)
        return Generation(session_id, msgs, ids, sampling, continue_final)

    def check_features(self, sampling: SamplingParams) -> SamplingParams:
        for name in ("frequency_penalty", "presence_penalty", "response_format"):
            if getattr(sampling, name) and name not in self.features:
                raise InvalidRequest(f"{name}: not supported by the {self.backend_name} backend", param=name)
        return sampling

    @property
    def backend_name(self) -> str:
        return type(self).__name__.removesuffix("Engine").lower() or "this"

    def stream_completion(self, prompt: str, sampling: SamplingParams | None = None,
                          session_id: str = "default") -> Iterator[Delta]:
        """Like stream_chat for a plain prompt (no chat template): the model goes on with the
        text. Control-token text in it stays text, as in a chat message."""
        if "completions" not in self.features:
            raise InvalidRequest(f"prompt: plain completions are not supported by the {self.backend_name} "
                                 "backend (use chat completions)", param="prompt")
        sampling = self.check_features((sampling or SamplingParams()).validate())
        prompt = check_text(prompt, "prompt")
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        ids = None
        if self.prompt is not None:
            ids = self.prompt.encode_plain(prompt)
            if len(ids) + sampling.max_new_tokens > self.session_len:
                raise ContextOverflow(f"the prompt is {len(ids)} tokens; with max_tokens {sampling.max_new_tokens} "
                                      f"that is more than the context of {self.session_len} tokens", param="prompt")
        gen = Generation(session_id, [], ids, sampling)
        gen.raw_prompt = prompt
        return self._stream(gen)

    def _stream(self, gen: Generation) -> Iterator[Delta]:
        gen.streamed = True
        self._sessions.add(gen.session_id, gen)
        try:
            meter = UsageMeter(prompt_tokens=len(gen.prompt_ids or ()))
            stop, hold = StopStringFilter(gen.sampling.stop), _TrailingReplacementHold()
            finish, pieces, counted = None, 0, None
            backend = self.generate(gen)
            try:
                for piece in backend:
                    if piece.prompt_tokens is not None:
                        meter.prompt_tokens = piece.prompt_tokens
                    if piece.completion_tokens is not None:
                        counted = piece.completion_tokens
                    if piece.text:
                        pieces += 1
                    # backends that do not count tokens: one piece of text ~ one token
                    meter.tokens_out(pieces if counted is None else counted)
                    finish = piece.finish_reason or finish
                    text = stop.feed(hold.feed(piece.text))
                    if text:
                        yield Delta(text)
                    if stop.stopped or gen.cancelled.is_set():
                        break
            finally:
                backend.close()  # the backend stops and cleans up at once
            ended = finish or ("length" if meter.tokens >= gen.sampling.max_new_tokens else "stop")
            if not stop.stopped:
                held = hold.flush()
                text = stop.feed(held) if ended != "length" and not gen.cancelled.is_set() else ""
                text += stop.flush()
                if text:
                    yield Delta(text)
            if gen.cancelled.is_set():
                reason = "cancelled"
            elif stop.stopped:
                reason = "stop"
            else:
                reason = ended
            yield Delta("", meter.usage(reason))
        finally:
            self._sessions.remove(gen.session_id, gen)

    def chat(self, messages: Sequence[Message], sampling: SamplingParams | None = None,
             session_id: str = "default") -> tuple[str, Usage]:
        parts, usage = [], Usage()
        for delta in self.stream_chat(messages, sampling, session_id):
            parts.append(delta.text)
            usage = delta.usage or usage
        return "".join(parts), usage

    def cancel(self, session_id: str) -> bool:
        """Stop the session's running generation; True if one was running."""
        gen = self._sessions.get(session_id)
        if gen is None:
            return False
        gen.cancel()
        return True

    def health(self) -> str:
        """"" when the engine can answer now, else what is wrong (one line, for operators)."""
        return ""

    def running_sessions(self) -> list[str]:
        """Session ids with a generation running now."""
        return [sid for sid, _ in self._sessions.items()]

    def wait_session_free(self, session_id: str, timeout: float = 10.0) -> bool:
        """Block until the session has no running generation (e.g. after `cancel`)."""
        return self._sessions.wait_free(session_id, timeout)

    def close(self) -> None:
        """Release the model / connections."""

    def cancel_all(self) -> None:
        for _, gen in self._sessions.items():
            gen.cancel()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
