"""Validate an OpenAI-`messages` JSONL dataset before XTuner sees it: XTuner silently drops empty
samples and truncates long ones. Every data tool and the train command run this first.

    python -m training.data.validate data.jsonl [--tokenizer MODEL] [--max-length 2048]

One line per sample: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]},
an optional system message first, then user/assistant turns, ending with the assistant.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .io import DataError, read_records, run_cli

ROLES = ("system", "user", "assistant")


@dataclass
class Report:
    samples: int = 0
    turns: int = 0
    max_tokens: int = 0
    token_counts: list[int] = field(default_factory=list)
    distinct: int = 0  # samples that differ from one another

    def duplicates_note(self) -> str:
        """Said when most records are copies (the tutorials' generate_data.py writes one sample
        10,001 times): the model sees few examples, however many lines the file has."""
        if self.samples < 10 or self.distinct > self.samples / 2:
            return ""
        return (f"mostly duplicates: {self.samples:,} records, {self.distinct:,} distinct (each repeated "
                f"~{self.samples / max(1, self.distinct):,.0f}x)")


def check_sample(where: str, obj: Any) -> list[dict]:
    """The sample's messages, checked: {"messages": [...]} (OpenAI format) or XTuner's
    {"conversation": [{"system", "input", "output"}, ...]}; errors name `where` and the field."""
    if isinstance(obj, dict) and "messages" not in obj and "conversation" in obj:
        obj = {"messages": conversation_messages(where, obj["conversation"])}
    if not isinstance(obj, dict) or "messages" not in obj:
        found = f"an object with keys {', '.join(list(obj)[:6])}" if isinstance(obj, dict) else \
            f"a JSON {type(obj).__name__}"
        raise DataError(f"{where}: messages: missing (expected {{\"messages\": [...]}} or "
                        f"{{\"conversation\": [...]}}, found {found})")
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: messages: must be a non-empty list")
    expect = "user"
    for i, m in enumerate(msgs):
        f = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{f}: must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{f}.role: unknown role {role!r} (use {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{f}.content: must be a string, got {_kind(content)}")
        if not content.strip():
            raise DataError(f"{f}.content: empty {role} turn")
        if role == "system":
            if i != 0:
                raise DataError(f"{f}.role: a system message may only come first")
            continue
        if role != expect:
            raise DataError(f"{f}.role: expected {expect} here, got {role}")
        expect = "assistant" if role == "user" else "user"
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: messages: must end with an assistant answer")
    return msgs


def _kind(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, dict):
        return f"an object with keys {', '.join(map(str, list(value)[:5])) or '(none)'}"
    return f"a JSON {type(value).__name__}" if not isinstance(value, list) else "a list"


def conversation_messages(where: str, conv: Any) -> list[dict]:
    """XTuner's conversation turns as messages, checked in the file's own terms (an error names
    conversation[i].input, not the messages it becomes)."""
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: conversation: missing or empty")
    msgs = []
    for i, turn in enumerate(conv):
        at = f"{where}: conversation[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: must be an object with input and output, got {_kind(turn)}")
        for key in ("system", "input", "output"):
            value = turn.get(key, "")
            if key == "system" and value in (None, ""):
                continue
            if not isinstance(value, str):
                hint = " (put it in quotes: the answer is text)" if isinstance(value, (int, float)) \
                    and not isinstance(value, bool) else ""
                raise DataError(f"{at}.{key}: must be a string, got {_kind(value)}{hint}")
            if key != "system" and not value.strip():
                raise DataError(f"{at}.{key}: empty (XTuner would drop the sample)")
        if i == 0 and turn.get("system"):
            msgs.append({"role": "system", "content": turn["system"]})
        msgs += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    return msgs


def samples(path: str | Path) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) of every sample in a JSONL file or JSON array, either format."""
    for where, obj in read_records(path):
        yield where, check_sample(where, obj)


def validate(path: str | Path, tokenizer: Any = None, max_length: int | None = None,
             template: Any = None) -> Report:
    """Raise DataError at the first problem; return counts. With a tokenizer and max_length,
    samples whose rendered length exceeds max_length are errors (XTuner would cut them)."""
    report, seen = Report(), set()
    for where, msgs in samples(path):
        report.samples += 1
        seen.add(hash(tuple((m["role"], m["content"]) for m in msgs)))
        report.turns += sum(m["role"] == "assistant" for m in msgs)
        if tokenizer is not None:
            tokens = count_tokens(tokenizer, msgs, template)
            report.token_counts.append(tokens)
            report.max_tokens = max(report.max_tokens, tokens)
            if max_length and tokens > max_length:
                raise DataError(f"{where}: messages: {tokens} tokens, more than max_length "
                                f"{max_length} (XTuner would truncate it)")
    if report.samples == 0:
        raise DataError(f"{path}: no samples")
    report.distinct = len(seen)
    return report


def count_tokens(tokenizer: Any, msgs: list[dict], template: Any = None) -> int:
    """Tokens of the sample as trained: XTuner's template when given, else the tokenizer's."""
    if template is not None:
        text = render_xtuner(template, msgs)
        return len(tokenizer.encode(text, add_special_tokens=True))
    if getattr(tokenizer, "chat_template", None):
        return len(tokenizer.apply_chat_template(msgs, tokenize=True))
    return len(tokenizer.encode("\n".join(m["content"] for m in msgs), add_special_tokens=True))


def render_xtuner(template: dict, msgs: list[dict]) -> str:
    """Render like XTuner's template_map_fn: SYSTEM + INSTRUCTION, output + SUFFIX, SEP."""
    out, system = [], ""
    first = True
    for m in msgs:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            if first and system:
                out.append(template.get("SYSTEM", "").format(system=system))
            out.append(template["INSTRUCTION"].format(input=m["content"], round=1))
            first = False
        else:
            out.append(m["content"] + template.get("SUFFIX", "") + template.get("SEP", ""))
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--tokenizer", help="model folder whose tokenizer counts tokens")
    p.add_argument("--max-length", type=int, default=None, help="needs --tokenizer")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the tokenizer folder's own code (a data tool runs none unless asked)")
    a = p.parse_args(argv)
    if a.max_length is not None and not a.tokenizer:
        print("error: --max-length needs --tokenizer MODEL (to count the tokens of each sample)", file=sys.stderr)
        return 1
    tok = None
    if a.tokenizer:
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(a.tokenizer, trust_remote_code=a.trust_remote_code)
        except Exception as exc:  # e.g. a tokenizer that is code, without --trust-remote-code
            print(f"error: {a.tokenizer}: the tokenizer cannot be loaded: {str(exc).splitlines()[0]}"
                  + ("" if a.trust_remote_code else " (a tokenizer that is code needs --trust-remote-code)"),
                  file=sys.stderr)
            return 1
    bad = 0
    for f in a.files:  # every file gets its line, good or bad
        def one(f: str = f) -> str:
            r = validate(f, tok, a.max_length)
            extra = f", longest {r.max_tokens} tokens" if tok is not None else ""
            note = f"; note: {r.duplicates_note()}" if r.duplicates_note() else ""
            return f"{f}: {r.samples} samples, {r.turns} answers{extra}: OK{note}"
        bad += run_cli(one) != 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
