"""A generated image Q&A set for the offline LLaVA demo: squares of a few colours drawn with
PIL at random places and sizes on white, asked "What colour is the square?".

    python -m training.data.shapes OUT_DIR [--per-colour 12] [--seed 0]

Writes OUT_DIR/images/*.png, OUT_DIR/train.json (LLaVA format) and OUT_DIR/test.json (other
squares, for before/after answers).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from .io import run_cli
from .llava import write_json

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
QUESTION = "What colour is the square?"


def answer(colour: str) -> str:
    return f"The square is {colour}."


def generate(out: str | Path, per_colour: int = 12, test_per_colour: int = 2, size: int = 64, seed: int = 0) -> str:
    from PIL import Image, ImageDraw

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sets: dict[str, list] = {"train": [], "test": []}
    for colour, rgb in COLOURS.items():
        for k in range(per_colour + test_per_colour):
            split = "train" if k < per_colour else "test"
            im = Image.new("RGB", (size, size), (255, 255, 255))
            side = rng.randint(size // 3, size // 2)
            x, y = rng.randint(0, size - side), rng.randint(0, size - side)
            ImageDraw.Draw(im).rectangle([x, y, x + side, y + side], fill=rgb)
            name = f"{split}_{colour}_{k}.png"
            im.save(out / "images" / name)
            sets[split].append({"id": str(len(sets[split])), "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer(colour)}]})
    write_json(out / "train.json", sets["train"])
    write_json(out / "test.json", sets["test"])
    return f"{out}: {len(sets['train'])} training and {len(sets['test'])} test images"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--per-colour", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return run_cli(lambda: generate(a.out, a.per_colour, seed=a.seed))


if __name__ == "__main__":
    sys.exit(main())
