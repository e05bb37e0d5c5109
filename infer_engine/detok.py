"""Token ids -> text deltas, the same way for every backend that sees token ids."""
from __future__ import annotations

from typing import Any, Sequence


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
