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

    def __init__(self, tokenizer: Any, template: str = "auto", model_type: str = ""):
        self.tokenizer = tokenizer
        # HF fast tokenizers flip shared state for split_special_tokens on every call, so
        # concurrent encodes could parse a template's control tokens as text: serialise them.
        self._encode_lock = threading.Lock()
        self.control_tokens = control_tokens_of(tokenizer)
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
        self.stop_words = self._stop_words()
        self.stop_token_ids = self._single_token_ids(self.stop_words)

    @classmethod
    def from_pretrained(cls, model_path: str, template: str = "auto") -> "ChatPrompt":
        from transformers import AutoConfig, AutoTokenizer

        model_type = getattr(AutoConfig.from_pretrained(model_path, trust_remote_code=True), "model_type", "")
        return cls(AutoTokenizer.from_pretrained(model_path, trust_remote_code=True), template, model_type)

    # -- rendering -------------------------------------------------------------------
    def segments(self, messages: Sequence[dict]) -> list[Segment]:
        return self._named_segments(messages) if self.named else self._jinja_segments(messages)

    def _named_segments(self, messages: Sequence[dict]) -> list[Segment]:
        t, segs = self.named, []

        def add(fmt: str, key: str, content: str) -> None:
            before, after = fmt.split("{" + key + "}")
            segs.extend([Segment(before, True), Segment(content, False), Segment(after, True)])

        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        if system:
            add(t.system, "system", system)
        for m in messages:
            if m["role"] == "user":
                add(t.instruction, "input", m["content"])
            elif m["role"] == "assistant":
                segs += [Segment(m["content"], False), Segment(t.suffix + t.sep, True)]
        if self.tokenizer.bos_token:  # XTuner prepends BOS to every sample
            segs.insert(0, Segment(self.tokenizer.bos_token, True))
        return [s for s in segs if s.text]

    def _jinja_segments(self, messages: Sequence[dict]) -> list[Segment]:
        # Render with placeholders, then cut the result back into template text and content.
        marked = [{"role": m["role"], "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        rendered = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
        segs, pos = [], 0
        for match in self._PLACEHOLDER.finditer(rendered):
            segs.append(Segment(rendered[pos:match.start()], True))
            segs.append(Segment(messages[int(match.group(1))]["content"], False))
            pos = match.end()
        segs.append(Segment(rendered[pos:], True))
        return [s for s in segs if s.text]

    def encode(self, messages: Sequence[dict]) -> list[int]:
        """Token ids with content encoded as plain text (special-token parsing off)."""
        ids: list[int] = []
        segments = self.segments(messages)
        with self._encode_lock:
            for seg in segments:
                ids += self.tokenizer.encode(seg.text, add_special_tokens=False,
                                             split_special_tokens=not seg.trusted)
        return ids

    def text(self, messages: Sequence[dict]) -> str:
        """The prompt as one string for engines that tokenize it themselves (no leading BOS:
        they add it), with control tokens in content neutralised."""
        segs = self.segments(messages)
        bos = self.tokenizer.bos_token
        if bos and segs and segs[0].trusted and segs[0].text.startswith(bos):
            segs[0] = Segment(segs[0].text[len(bos):], True)
        return "".join(s.text if s.trusted else escape_control_tokens(s.text, self.control_tokens)
                       for s in segs)

    # -- context window ----------------------------------------------------------------
    def fit(self, messages: Sequence[dict], session_len: int, max_new_tokens: int
            ) -> tuple[list[dict], list[int]]:
        """Drop the oldest turns (never system messages) until prompt + max_new_tokens fits."""
        msgs = list(messages)
        while True:
            ids = self.encode(msgs)
            if len(ids) + max_new_tokens <= session_len:
                return msgs, ids
            first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
            last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
            if first is None or first >= last_user:
                raise ContextOverflow(
                    f"the last message needs {len(ids)} prompt tokens + max_new_tokens {max_new_tokens}, "
                    f"more than the context of {session_len} tokens: shorten it or lower max_new_tokens",
                    param="messages")
            # drop the oldest turn: its user message and every reply up to the next user message
            end = next((i for i in range(first + 1, len(msgs)) if msgs[i]["role"] == "user"), last_user)
            del msgs[first:end]

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
