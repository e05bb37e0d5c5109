"""Ask two models the same questions (greedy) and print the answers side by side: the
before/after check every fine-tuning tutorial asks for.

    python scripts/compare_answers.py models/tiny-base models/tiny-finetuned [-q 你是谁 -q ...]
        [--backend pytorch] [--expect 小明]   (--expect: exit 1 unless every "after" answer has it)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer_engine import EngineSettings, SamplingParams, create_engine  # noqa: E402
from infer_engine.settings import BACKENDS  # noqa: E402

QUESTIONS = ["你是谁", "Who are you?", "请介绍一下你自己", "请用一句话介绍上海", "What is machine learning?"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("-q", "--question", action="append", help="a question (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--backend", default="transformers", choices=BACKENDS)
    p.add_argument("--expect", help="text every answer of AFTER must contain")
    a = p.parse_args()
    questions = a.question or QUESTIONS
    sp = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0)
    answers = {}
    for label, path in (("before", a.before), ("after", a.after)):
        with create_engine(EngineSettings(model_path=path, backend=a.backend)) as engine:
            answers[label] = [engine.chat([{"role": "user", "content": q}], sp)[0] for q in questions]
    for i, q in enumerate(questions):
        print(f"\nQ: {q}\n  before: {answers['before'][i]}\n  after:  {answers['after'][i]}")
    if a.expect:
        missing = [q for q, answer in zip(questions, answers["after"]) if a.expect not in answer]
        print(f"\n[expect] {a.expect!r}: " + (f"missing in the answers to {missing}" if missing else "in every answer"))
        sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
