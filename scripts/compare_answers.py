"""Ask two models the same questions (greedy) and print the answers side by side: the
before/after check every fine-tuning tutorial asks for.

    python scripts/compare_answers.py models/tiny-internlm2-base models/tiny-internlm2-finetuned [-q 你是谁 -q ...]
        [--backend pytorch] [--expect 小明]   (--expect: exit 1 unless every "after" answer has it)
    python scripts/compare_answers.py BEFORE_LLAVA AFTER_LLAVA --images data/shapes/test.json \
        [--image-folder DIR] [--expect-reference]   (image questions: each record's image and question,
        its own answer beside; --expect-reference: exit 1 unless every "after" answer is the record's)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer_engine import EngineSettings, SamplingParams, create_engine  # noqa: E402
from infer_engine.images import data_url  # noqa: E402
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
    p.add_argument("--images", help="a LLaVA-format JSON: ask each record's question about its image")
    p.add_argument("--image-folder", help="where --images' image files are (default: beside it)")
    p.add_argument("--expect-reference", action="store_true", help="with --images: exit 1 unless each "
                   "after answer is the record's own answer")
    a = p.parse_args()
    sp = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0)
    if a.images:
        import json
        records = json.loads(Path(a.images).read_text(encoding="utf-8"))
        folder = Path(a.image_folder) if a.image_folder else Path(a.images).parent
        asks = [(r["conversations"][0]["value"].replace("<image>", "").strip(), r["image"],
                 r["conversations"][1]["value"]) for r in records]
    else:
        asks = [(q, None, None) for q in (a.question or QUESTIONS)]

    def message(question: str, image: str | None) -> list[dict]:
        if image is None:
            return [{"role": "user", "content": question}]
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(folder / image)}},
                                             {"type": "text", "text": question}]}]
    answers = {}
    for label, path in (("before", a.before), ("after", a.after)):
        with create_engine(EngineSettings(model_path=path, backend=a.backend)) as engine:
            answers[label] = [engine.chat(message(q, im), sp)[0] for q, im, _ in asks]
    for i, (q, image, ref) in enumerate(asks):
        head = f"Q: {q}" + (f"  [{image}]  expected: {ref}" if image else "")
        print(f"\n{head}\n  before: {answers['before'][i]}\n  after:  {answers['after'][i]}")
    if a.expect_reference and a.images:
        right = sum(ref.strip() == answer.strip() for (_, _, ref), answer in zip(asks, answers["after"]))
        before = sum(ref.strip() == answer.strip() for (_, _, ref), answer in zip(asks, answers["before"]))
        print(f"\n[expect] answers as the data says: before {before}/{len(asks)}, after {right}/{len(asks)}")
        sys.exit(0 if right == len(asks) else 1)
    if a.expect:
        missing = [q for (q, _, _), answer in zip(asks, answers["after"]) if a.expect not in answer]
        print(f"\n[expect] {a.expect!r}: " + (f"missing in the answers to {missing}" if missing else "in every answer"))
        sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
