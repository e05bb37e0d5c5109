"""Chat prompts: templates, control-token safety, and history truncation.

A rendered prompt is a list of segments: template text (trusted: may contain control tokens
such as `<|im_start|>`) and message content (untrusted: typed by users, always plain text).
Backends that tokenize themselves encode content with special-token parsing off; backends
that take a string (LMDeploy, remote servers) get content with control tokens neutralised.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import ContextOverflow, InvalidRequest

ZWSP = "\u200b"  # inserted inside a control token so no tokenizer can match it


@dataclass(frozen=True)
class NamedTemplate:
    """XTuner's PROMPT_TEMPLATE format: turn 0 = SYSTEM + INSTRUCTION, output + SUFFIX, SEP."""

    system: str
    instruction: str
    suffix: str = ""
    sep: str = ""
    stop_words: tuple[str, ...] = ()


_IM = dict(system="<|im_start|>system\n{system}<|im_end|>\n",
           instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
           suffix="<|im_end|>", sep="\n")

# Copied field for field from xtuner/utils/templates.py (XTuner 0.2.0).
NAMED_TEMPLATES: dict[str, NamedTemplate] = {
    "internlm2_chat": NamedTemplate(**_IM, stop_words=("<|im_end|>",)),
    "qwen_chat": NamedTemplate(**_IM, stop_words=("<|im_end|>", "<|endoftext|>")),
    "internlm_chat": NamedTemplate(system="<|System|>:{system}\n",
                                   instruction="<|User|>:{input}<eoh>\n<|Bot|>:",
                                   suffix="<eoa>", sep="\n", stop_words=("<eoa>",)),
    "default": NamedTemplate(system="<|System|>:{system}\n", instruction="<|User|>:{input}\n<|Bot|>:",
                             sep="\n"),
}


class _FastEncoders:
    """Two copies of a fast tokenizer's Rust tokenizer, one that parses control tokens (for
    template text) and one that never does (for content): nothing is flipped per call, so they
    need no lock, and `encode_batch` runs without the GIL."""

    @staticmethod
    def of(tokenizer: Any) -> dict[bool, Any] | None:
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) \
            else None
        if backend is None:
            return None
        from tokenizers import Tokenizer

        encoders = {}
        for trusted in (True, False):
            enc = Tokenizer.from_str(backend.to_str())
            enc.no_truncation()
            enc.no_padding()
            enc.encode_special_tokens = not trusted
            encoders[trusted] = enc
        return encoders


@dataclass(frozen=True)
class Segment:
    text: str
    trusted: bool  # template text (may hold control tokens) vs message content (plain text)


def escape_control_tokens(text: str, control_tokens: Sequence[str]) -> str:
    """Make every control-token string in `text` unmatchable by inserting a zero-width space."""
    for tok in sorted(control_tokens, key=len, reverse=True):
        if len(tok) > 1 and tok in text:
            text = text.replace(tok, tok[0] + ZWSP + tok[1:])
    return text


def control_tokens_of(tokenizer: Any) -> list[str]:
    """Every added/special token string of a HF tokenizer (what text could accidentally match)."""
    toks = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        toks.add(str(added))
    return sorted(t for t in toks if t)


# `auto` for a tokenizer without a chat template: the XTuner template of its architecture
TEMPLATE_BY_MODEL_TYPE = {"internlm2": "internlm2_chat", "qwen2": "qwen_chat", "internlm": "internlm_chat"}


class ChatPrompt:
    """Renders message lists for one tokenizer, with a named template or the tokenizer's own."""

    _PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")

    def __init__(self, tokenizer: Any, template: str = "auto", model_type: str = "",
                 eos_token_ids: Sequence[int] = ()):
        """`eos_token_ids`: the model's own end ids (its generation_config), which end a reply too
        (InternLM2's hub tokenizers name </s> as EOS; a chat turn ends with <|im_end|>)."""
        self.tokenizer = tokenizer
        self._fast = _FastEncoders.of(tokenizer)
        # HF tokenizers flip shared state for split_special_tokens on every call, so concurrent
        # encodes could parse a template's control tokens as text: without a fast tokenizer's
        # own two encoders, encodes are serialised.
        self._encode_lock = threading.Lock()
        self.control_tokens = control_tokens_of(tokenizer)
        # No token decodes to more characters than this: a text longer than the budget times
        # this cannot fit, whatever it holds, and is refused without being tokenized.
        self.max_token_chars = max([len(t) for t in tokenizer.get_vocab()] + [1])
        if template == "auto" and not getattr(tokenizer, "chat_template", None):
            template = TEMPLATE_BY_MODEL_TYPE.get(model_type, "")
            if not template:
                raise InvalidRequest("the tokenizer has no chat_template; name one with --chat-template "
                                     f"({', '.join(NAMED_TEMPLATES)})", param="chat_template")
        if template == "auto":
            self.named = None
        elif template in NAMED_TEMPLATES:
            self.named = NAMED_TEMPLATES[template]
        else:
            raise InvalidRequest(f"chat_template must be 'auto' or one of {', '.join(NAMED_TEMPLATES)}, "
                                 f"got {template!r}", param="chat_template")
        self.image_tokens = ""  # a vision-language backend sets its image placeholder run here
        self.stop_words = self._stop_words()
        self.stop_token_ids = list(dict.fromkeys(self._single_token_ids(self.stop_words) + list(eos_token_ids)))

    @classmethod
    def from_pretrained(cls, model_path: str, template: str = "auto") -> "ChatPrompt":
        """For engines that load the model themselves (LMDeploy, which runs the folder's own
        tokenizer code too): the tokenizer, and the model type and end ids read from the folder's
        config files (no model code runs here)."""
        from transformers import AutoTokenizer

        from .architectures import internlm2_config, read_config, read_eos_ids

        raw = read_config(model_path)
        model_type = str(raw.get("model_type", ""))
        # InternLM2's config as transformers' own class: AutoTokenizer would otherwise run the
        # folder's configuration code (which transformers 5 only half reads) to look at it
        config = internlm2_config(raw, 0) if model_type == "internlm2" else None
        return cls(AutoTokenizer.from_pretrained(model_path, trust_remote_code=True, config=config), template,
                   model_type, read_eos_ids(model_path))

    # -- rendering -------------------------------------------------------------------
    def segments(self, messages: Sequence[dict], continue_final: bool = False) -> list[Segment]:
        """With continue_final the last message is the start of the assistant's reply, which
        the model goes on with: the conversation before it, the generation prompt, that text,
        and no end-of-turn after it."""
        if continue_final:
            head = messages[:-1]
            return self.segments(head) + [Segment(messages[-1]["content"], False)] if messages[-1]["content"] \
                else self.segments(head)
        return self._named_segments(messages) if self.named else self._jinja_segments(messages)

    def _named_segments(self, messages: Sequence[dict]) -> list[Segment]:
        t, segs = self.named, []

        def add(fmt: str, key: str, content: str, prefix: str = "") -> None:
            before, after = fmt.split("{" + key + "}")
            segs.extend([Segment(before, True), Segment(prefix, True), Segment(content, False), Segment(after, True)])

        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        if system:
            add(t.system, "system", system)
        for m in messages:
            if m["role"] == "user":
                add(t.instruction, "input", m["content"], self._image_prefix(m))
            elif m["role"] == "assistant":
                segs += [Segment(m["content"], False), Segment(t.suffix + t.sep, True)]
        if messages[-1]["role"] != "user":  # system only, or after a reply: a new reply's start
            after = t.instruction.split("{input}")[1]
            segs.append(Segment(after[len(t.suffix):] if after.startswith(t.suffix) else after, True))
            if segs[-1].text.startswith(t.sep) and len(segs) > 1 and segs[-2].text.endswith(t.sep):
                segs[-1] = Segment(segs[-1].text[len(t.sep):], True)
        if self.tokenizer.bos_token:  # XTuner prepends BOS to every sample
            segs.insert(0, Segment(self.tokenizer.bos_token, True))
        return [s for s in segs if s.text]

    def _jinja_segments(self, messages: Sequence[dict]) -> list[Segment]:
        # Render with placeholders, then cut the result back into template text and content.
        marked = [{"role": m["role"], "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        try:
            rendered = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the model's own template refuses this conversation's shape
            raise InvalidRequest(f"messages: the model's chat template refused them: {exc}",
                                 param="messages") from None
        segs, pos = [], 0
        for match in self._PLACEHOLDER.finditer(rendered):
            segs.append(Segment(rendered[pos:match.start()], True))
            segs.append(Segment(self._image_prefix(messages[int(match.group(1))]), True))
            segs.append(Segment(messages[int(match.group(1))]["content"], False))
            pos = match.end()
        segs.append(Segment(rendered[pos:], True))
        return [s for s in segs if s.text]

    def _image_prefix(self, message: dict) -> str:
        """A user message's images as the model's image tokens (trusted text: typed "<image>"
        in content stays text), one run per image, each on its own line, before the text."""
        n = len(message.get("images", ()))
        return (self.image_tokens + "\n") * n if n and self.image_tokens else ""

    def encode(self, messages: Sequence[dict], continue_final: bool = False) -> list[int]:
        """Token ids with content encoded as plain text (special-token parsing off)."""
        return self._encode_segments(self.segments(messages, continue_final), {})

    def encode_plain(self, text: str) -> list[int]:
        """A plain prompt's ids: BOS where the model uses one, then the text as text."""
        bos = self.tokenizer.bos_token
        return self._encode_segments(([Segment(bos, True)] if bos else []) + [Segment(text, False)], {})

    def plain_text(self, text: str) -> str:
        """A plain prompt for engines that tokenize it themselves, control tokens neutralised."""
        return escape_control_tokens(text, self.control_tokens)

    def _encode_segments(self, segments: Sequence[Segment], cache: dict) -> list[int]:
        """Encode segment by segment (ids are additive over segments), each distinct segment
        once per `cache`."""
        todo = [s for s in dict.fromkeys(segments) if s not in cache]
        if self._fast is not None:  # the tokenizers library releases the GIL in encode_batch
            for trusted in (True, False):
                batch = [s for s in todo if s.trusted == trusted]
                if batch:
                    encs = self._fast[trusted].encode_batch([s.text for s in batch], add_special_tokens=False)
                    cache.update((s, e.ids) for s, e in zip(batch, encs))
        else:
            with self._encode_lock:
                for seg in todo:
                    cache[seg] = self.tokenizer.encode(seg.text, add_special_tokens=False,
                                                       split_special_tokens=not seg.trusted)
        ids: list[int] = []
        for seg in segments:
            ids += cache[seg]
        return ids

    def text(self, messages: Sequence[dict], continue_final: bool = False) -> str:
        """The prompt as one string for engines that tokenize it themselves (no leading BOS:
        they add it), with control tokens in content neutralised."""
        segs = self.segments(messages, continue_final)
        bos = self.tokenizer.bos_token
        if bos and segs and segs[0].trusted and segs[0].text.startswith(bos):
            segs[0] = Segment(segs[0].text[len(bos):], True)
        return "".join(s.text if s.trusted else escape_control_tokens(s.text, self.control_tokens)
                       for s in segs)

    # -- context window ----------------------------------------------------------------
    def fit(self, messages: Sequence[dict], session_len: int, max_new_tokens: int,
            continue_final: bool = False) -> tuple[list[dict], list[int]]:
        """Keep the system messages and as many of the newest turns as fit with max_new_tokens,
        dropping the oldest first. A turn is a user message and the replies up to the next one.

        Linear in what is kept: each distinct segment is tokenized once, and the number of
        turns kept is found by doubling, then halving, from the newest (log-many renders of
        what is kept), so a long history's dropped turns are never tokenized."""
        msgs = list(messages)
        budget = session_len - max_new_tokens
        if budget < 1:
            raise ContextOverflow(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the "
                                  f"context of {session_len} tokens: lower it", param="max_new_tokens")
        starts = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        # Leading replies before the first user message form a turn of their own.
        first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
        if first is not None and (not starts or first < starts[0]):
            starts.insert(0, first)
        if not starts:  # system messages only: nothing to drop
            ids = self._encode_segments(self.segments(msgs, continue_final), {})
            if len(ids) > budget:
                raise self._overflow(msgs, session_len, max_new_tokens, {}, continue_final)
            return msgs, ids
        cache: dict = {}

        def kept(k: int) -> list[dict]:  # system messages + the newest k turns
            cut = starts[len(starts) - k]
            return [m for i, m in enumerate(msgs) if i >= cut or m["role"] == "system"]

        def encoded(k: int) -> list[int] | None:  # the ids when k turns fit, else None
            sub = kept(k)
            if sum(len(m["content"]) for m in sub) > budget * self.max_token_chars:
                return None  # too long whatever it holds: not worth tokenizing
            ids = self._encode_segments(self.segments(sub, continue_final), cache)
            return ids if len(ids) <= budget else None

        best = encoded(len(starts))
        if best is not None:
            return msgs, best
        best = encoded(1)
        if best is None:
            raise self._overflow(kept(1), session_len, max_new_tokens, cache, continue_final)
        lo, hi = 1, len(starts)  # lo turns fit, hi turns do not
        k = 2
        while k < hi:  # double from the newest turn...
            ids = encoded(k)
            if ids is None:
                hi = k
                break
            lo, best, k = k, ids, 2 * k
        while hi - lo > 1:  # ...then halve between what fits and what does not
            mid = (lo + hi) // 2
            ids = encoded(mid)
            if ids is None:
                hi = mid
            else:
                lo, best = mid, ids
        return kept(lo), best

    def _overflow(self, sub: list[dict], session_len: int, max_new_tokens: int,
                  cache: dict, continue_final: bool = False) -> ContextOverflow:
        """Say what is too long: the system prompt, or the newest message; and how many new
        tokens would fit with this prompt."""
        def size(ms: list[dict]) -> tuple[int, str]:  # (tokens or a lower bound, as words)
            chars = sum(len(m["content"]) for m in ms)
            if chars > session_len * self.max_token_chars:  # too long to be worth tokenizing
                return chars // self.max_token_chars, f"{chars} characters"
            n = len(self._encode_segments([Segment(m["content"], False) for m in ms], cache))
            return n, f"{n} tokens"

        room = f"with max_new_tokens {max_new_tokens} that is more than the context of {session_len} tokens"
        system = [m for m in sub if m["role"] == "system"]
        if system:
            n, words = size(system)
            if n + max_new_tokens >= session_len:
                return ContextOverflow(f"the system prompt is {words}; {room}: shorten the system "
                                       "prompt or lower max_new_tokens", param="messages")
        _, words = size([sub[-1]])
        fits = None
        if sum(len(m["content"]) for m in sub) <= session_len * self.max_token_chars:
            left = session_len - len(self._encode_segments(self.segments(sub, continue_final), cache))
            fits = left if left >= 16 else None  # fewer would hardly be an answer
        return ContextOverflow(f"the last message is {words}" + (" (plus the system prompt)" if system else "")
                               + f"; {room}: shorten it or lower max_new_tokens"
                               + (f" to {fits}" if fits else ""), param="messages", max_new_tokens_that_fit=fits)

    # -- stop words --------------------------------------------------------------------
    def _stop_words(self) -> list[str]:
        words = list(self.named.stop_words) if self.named else []
        if self.tokenizer.eos_token:
            words.append(self.tokenizer.eos_token)
        return list(dict.fromkeys(words))

    def _single_token_ids(self, words: Sequence[str]) -> list[int]:
        ids = []
        for w in words:
            enc = self.tokenizer.encode(w, add_special_tokens=False)
            if len(enc) == 1:
                ids.append(enc[0])
        return ids
