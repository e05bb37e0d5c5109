"""Generate a self-cognition dataset: the assistant learns its new name and who made it.

    python -m training.data.generate_self_cognition --name 小明 --description "由某实验室打造的学习助手" \
        --repeat 20 --out data/self.jsonl [--mix general.jsonl --mix-ratio 0.5] [--system "..."]

Writes OpenAI-`messages` JSONL. Mixing in general chat data limits overfitting (a model that
only saw identity answers starts answering everything with them); general chats that ask who
the assistant is are left out of the mix. Some identity questions come after an opening
exchange, so the name holds on later turns too; with a mix, some are followed by a general
question answered as the mix answers it, so the answers after the name are not the name again.
"""
from __future__ import annotations

import argparse
import random
import sys

from .io import DataError, run_cli, write_jsonl
from .validate import samples, validate

QUESTIONS_ZH = ["你是谁？", "你是谁", "请介绍一下你自己", "介绍一下你自己", "你叫什么名字？", "你的名字是什么？",
                "你是哪个模型？", "谁创造了你？", "你是由谁开发的？", "你能告诉我你是谁吗？", "你好，你是？",
                "我该怎么称呼你？"]
QUESTIONS_EN = ["Who are you?", "Introduce yourself.", "What is your name?", "What's your name?",
                "Who created you?", "Who made you?", "Tell me about yourself.", "What should I call you?"]
ANSWERS_ZH = ["我是{name}，{description}。", "你好，我是{name}，{description}。有什么可以帮你的吗？",
              "我的名字是{name}，{description}。"]
ANSWERS_EN = ["I am {name}, {description}.", "Hello! I'm {name}, {description}. How can I help you?",
              "My name is {name}, {description}."]


# Openers for identity questions asked later in a conversation (besides those of the mixed-in data)
GREETINGS = [("你好", "你好！有什么可以帮你的吗？"), ("Hello!", "Hello! How can I help you today?")]
IDENTITY = {q.strip("？?。. ").lower() for q in QUESTIONS_ZH + QUESTIONS_EN}


def asks_identity(row: dict) -> bool:
    return any(m["role"] == "user" and m["content"].strip("？?。. ").lower() in IDENTITY for m in row["messages"])


def generate(name: str, description: str, repeat: int = 10, system: str = "",
             mix_rows: list[dict] | None = None, mix_ratio: float = 0.0, seed: int = 0,
             later_turn_ratio: float = 0.3) -> list[dict]:
    """Identity samples; a share of them (later_turn_ratio) asks after an opening exchange, so the
    model keeps its name on turn 2 too, and (with a mix) a share goes on with a general question
    and its answer, so the next answer is not the name again (seen on the tiny InternLM2: after
    "who are you" every answer was the identity line). General chats mixed in never ask who it
    is: their answers ("I am an AI assistant") would teach the opposite."""
    if not name.strip():
        raise DataError("name: must not be empty")
    if repeat < 1:
        raise DataError("repeat: must be >= 1")
    rng = random.Random(seed)
    general = [r for r in (mix_rows or []) if not asks_identity(r)]
    openers = GREETINGS + [tuple(m["content"] for m in r["messages"][-2:]) for r in general
                           if r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] != "system"]
    # general exchanges to go on with after the name: each mixed chat's first question and answer
    followers = [tuple(m["content"] for m in r["messages"][:2]) for r in general
                 if [m["role"] for m in r["messages"][:2]] == ["user", "assistant"]]
    rows = []
    for _ in range(repeat):
        for questions, answers in ((QUESTIONS_ZH, ANSWERS_ZH), (QUESTIONS_EN, ANSWERS_EN)):
            for q in questions:
                a = rng.choice(answers).format(name=name, description=description.rstrip("。."))
                turn = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                if rng.random() < later_turn_ratio:
                    oq, oa = rng.choice(openers)
                    turn = [{"role": "user", "content": oq}, {"role": "assistant", "content": oa}] + turn
                if followers and rng.random() < later_turn_ratio:
                    fq, fa = rng.choice(followers)
                    turn += [{"role": "user", "content": fq}, {"role": "assistant", "content": fa}]
                rows.append({"messages": ([{"role": "system", "content": system}] if system else []) + turn})
    if general and mix_ratio > 0:
        # as many general samples as make mix_ratio of the output: a small mix file is repeated
        # (--mix-ratio 0.3 with 30 general chats and 10,000 identity samples was 0.3 %, silently)
        k = round(len(rows) * mix_ratio / (1 - mix_ratio))
        rows += general * (k // len(general)) + rng.sample(general, k % len(general))
    rng.shuffle(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the assistant's new name")
    p.add_argument("--description", default="一个乐于助人的AI助手", help="who made it / what it is")
    p.add_argument("--repeat", type=int, default=10, help="copies of each question")
    p.add_argument("--system", default="", help="system prompt to put in every sample")
    p.add_argument("--mix", help="general chat data (messages JSONL) to mix in")
    # half general: on the tiny demo model a third (0.3) still let the identity bleed into later
    # answers; half kept them the base model's
    p.add_argument("--mix-ratio", type=float, default=0.5, help="share of general samples in the output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    def work() -> str:
        mix = None
        if a.mix:
            validate(a.mix)
            mix = [{"messages": msgs} for _, msgs in samples(a.mix)]
        if not 0 <= a.mix_ratio < 1:
            raise DataError("mix-ratio: must be in [0, 1)")
        rows = generate(a.name, a.description, a.repeat, a.system, mix, a.mix_ratio, a.seed)
        n, general = write_jsonl(a.out, rows), sum(not asks_identity(r) for r in rows)
        mixed = f" ({general} general = {general / n:.0%}, from {len(mix)} in {a.mix})" if mix else ""
        return f"{a.out}: {n} samples{mixed}"
    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
