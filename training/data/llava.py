"""LLaVA-format image Q&A data, as XTuner's LLaVA configs read it: a JSON array of

    {"id": "0", "image": "shapes/0.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the square?"},
                       {"from": "gpt", "value": "Red."}]}

    python -m training.data.llava validate data.json [--image-folder DIR]
    python -m training.data.llava repeat -i unique_data.json -o repeated_data.json -n 200 [--shuffle]
    python -m training.data.llava from-sheet qa.csv data.json [--image-folder DIR] \
        [--image-column image --question-column question --answer-column answer]

Every tool checks every record first (each image file exists under the image folder and opens
as an image; `<image>` once, in the first human turn; turns alternate human / gpt; no empty
text) and stops at the first problem with one line naming the file and record; nothing is
written then.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Iterable

from .io import DataError, atomic_path, read_records, run_cli

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
MAX_IMAGE_PIXELS = 64_000_000  # larger is refused as a decompression bomb


class _Images:
    """Checks each image file once (repeated data names the same files many times)."""

    def __init__(self, folder: Path):
        self.folder, self.seen = folder, {}

    def check(self, where: str, name: Any) -> None:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: image: expected a file name, got {name!r}")
        path = self.folder / name
        if path in self.seen:
            if self.seen[path]:
                raise DataError(f"{where}: image {name}: {self.seen[path]}")
            return
        why = self._problem(path)
        self.seen[path] = why
        if why:
            raise DataError(f"{where}: image {name}: {why}")

    @staticmethod
    def _problem(path: Path) -> str:
        from PIL import Image

        if not path.is_file():
            return f"no such file ({path})"
        try:
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    return f"{im.width}x{im.height} pixels is more than {MAX_IMAGE_PIXELS:,}"
                im.verify()
            with Image.open(path) as im:
                im.load()  # verify() misses a truncated file's missing tail
        except Image.DecompressionBombError:
            return f"more than {MAX_IMAGE_PIXELS:,} pixels (refused as a decompression bomb)"
        except Exception as exc:  # PIL raises many kinds for broken files
            return f"does not open as an image ({type(exc).__name__}: {exc})"
        return ""


def check_record(where: str, rec: Any, images: _Images | None) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with image and conversations, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise DataError(f"{where}: conversations: expected a list of at least 2 turns (human, gpt)")
    count = 0
    for i, turn in enumerate(conv):
        at = f"{where}: conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected an object with from and value")
        want = ROLES[i % 2]
        if turn.get("from") != want:
            raise DataError(f"{at}.from: expected {want!r} (turns alternate human, gpt), got {turn.get('from')!r}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.replace(IMAGE_TOKEN, "").strip():
            raise DataError(f"{at}.value: empty or not text")
        n = value.count(IMAGE_TOKEN)
        if n and i != 0:
            raise DataError(f"{at}.value: {IMAGE_TOKEN} belongs in the first human turn only")
        count += n
    if len(conv) % 2:
        raise DataError(f"{where}: conversations: ends with a human turn (no answer to learn)")
    if "image" in rec:
        if count != 1:
            raise DataError(f"{where}: conversations[0].value: needs {IMAGE_TOKEN} exactly once for the image, "
                            f"found {count}")
        if images is not None:
            images.check(where, rec["image"])
    elif count:
        raise DataError(f"{where}: {IMAGE_TOKEN} in a record without an image")
    return rec


def load(path: str | Path, image_folder: str | Path | None = None, check_images: bool = True) -> list[dict]:
    """All records of `path`, each checked; images are looked up under `image_folder` (default:
    the data file's folder)."""
    path = Path(path)
    images = _Images(Path(image_folder) if image_folder else path.parent) if check_images else None
    out = [check_record(where, rec, images) for where, rec in read_records(path)]
    if not out:
        raise DataError(f"{path}: no records")
    return out


def write_json(path: str | Path, records: Iterable[dict]) -> int:
    """A JSON array, written atomically (what XTuner's LLaVA dataset reads)."""
    rows = list(records)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(rows)


def repeat(src: str | Path, out: str | Path, times: int = 0, size: int = 0, shuffle: bool = False,
           seed: int = 0, image_folder: str | Path | None = None) -> str:
    """The tutorial's repeat.py: every record `times` times, or cycled to `size` records;
    shuffled with a seed if asked. Ids are made unique (XTuner keys on them)."""
    if (times > 0) == (size > 0):
        raise DataError("repeat: give -n TIMES or --size N (one of them, > 0)")
    records = load(src, image_folder)
    total = size or times * len(records)
    rows = [dict(records[i % len(records)]) for i in range(total)]
    if shuffle:
        random.Random(seed).shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = str(i)
    n = write_json(out, rows)
    return f"{out}: {n} records ({len(records)} unique)"


def from_sheet(src: str | Path, out: str | Path, image_folder: str | Path | None = None,
               image_column: str = "image", question_column: str = "question",
               answer_column: str = "answer", sheet: str | None = None) -> str:
    """(image, question, answer) rows of a CSV or XLSX sheet -> LLaVA records."""
    from .convert import rows_of_sheet

    src = Path(src)
    header, rows = rows_of_sheet(src, sheet)
    cols = {}
    for name in (image_column, question_column, answer_column):
        if name not in header:
            raise DataError(f"{src}: no column {name!r} (columns: {', '.join(map(str, header))})")
        cols[name] = header.index(name)
    folder = Path(image_folder) if image_folder else src.parent
    images = _Images(folder)
    records = []
    for row_no, values in rows:
        where = f"{src}:{row_no}"
        image, question, answer = (_cell(values, cols[c]) for c in (image_column, question_column, answer_column))
        if not (image or question or answer):
            continue  # a blank row
        rec = {"id": str(len(records)), "image": image, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]}
        records.append(check_record(where, rec, images))
    if not records:
        raise DataError(f"{src}: no rows")
    n = write_json(out, records)
    return f"{out}: {n} records"


def _cell(values: list, i: int) -> str:
    return "" if i >= len(values) or values[i] is None else str(values[i]).strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check every record and image")
    v.add_argument("file")
    v.add_argument("--image-folder")
    r = sub.add_parser("repeat", help="repeat / shuffle records to a training set")
    r.add_argument("-i", "--input", required=True)
    r.add_argument("-o", "--output", required=True)
    r.add_argument("-n", "--times", type=int, default=0, help="every record this many times")
    r.add_argument("--size", type=int, default=0, help="or: cycle the records to this many")
    r.add_argument("--shuffle", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--image-folder")
    s = sub.add_parser("from-sheet", help="a CSV/XLSX of image, question, answer -> LLaVA JSON")
    s.add_argument("sheet_file")
    s.add_argument("output")
    s.add_argument("--image-folder")
    s.add_argument("--image-column", default="image")
    s.add_argument("--question-column", default="question")
    s.add_argument("--answer-column", default="answer")
    s.add_argument("--sheet")
    a = p.parse_args(argv)

    def work() -> str:
        if a.cmd == "validate":
            recs = load(a.file, a.image_folder)
            return f"{a.file}: {len(recs)} records, {len({r['image'] for r in recs if 'image' in r})} images: ok"
        if a.cmd == "repeat":
            return repeat(a.input, a.output, a.times, a.size, a.shuffle, a.seed, a.image_folder)
        return from_sheet(a.sheet_file, a.output, a.image_folder, a.image_column, a.question_column,
                          a.answer_column, a.sheet)
    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
