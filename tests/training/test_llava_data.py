"""LLaVA data tools: the tutorial's repeat.py step and a sheet converter, with every record and
image checked before anything is written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT
from training.data.io import DataError
from training.data.llava import from_sheet, load, repeat


def rec(image="red.png", q="<image>\nWhat colour is the square?", a="Red.", **extra):
    return {"id": "0", "image": image, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
            **extra}


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (32, 32), (220, 20, 20)).save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (20, 20, 220)).save(tmp_path / "blue.png")
    return tmp_path


def write(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    return path


def test_good_data_loads(folder):
    data = write(folder / "d.json", [rec(), rec("blue.png", a="Blue.")])
    assert len(load(data)) == 2


def bad_png(folder):
    (folder / "text.png").write_text("not an image")
    return "text.png"


def truncated_png(folder):
    raw = (folder / "red.png").read_bytes()
    (folder / "cut.png").write_bytes(raw[: len(raw) // 2])
    return "cut.png"


def bomb_png(folder):
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    return "bomb.png"


@pytest.mark.parametrize("make,expect", [
    (lambda f: rec("missing.png"), "image missing.png: no such file"),
    (lambda f: rec(bad_png(f)), "does not open as an image"),
    (lambda f: rec(truncated_png(f)), "does not open as an image"),
    (lambda f: rec(bomb_png(f)), "decompression bomb"),
    (lambda f: rec(q="<image><image>\nWhat?"), "exactly once"),
    (lambda f: rec(q="What colour?"), "exactly once"),
    (lambda f: rec(a="<image> red"), "first human turn only"),
    (lambda f: {"image": "red.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     "conversations[0].from: expected 'human'"),
    (lambda f: rec(a="  "), "conversations[1].value: empty"),
    (lambda f: {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"},
                                                      {"from": "human", "value": "q2"}]}, "ends with a human turn"),
    (lambda f: "just text", "expected an object"),
])
def test_bad_records_name_the_record_and_nothing_is_written(folder, make, expect):
    data = write(folder / "d.json", [rec(), make(folder)])
    out = folder / "out.json"
    with pytest.raises(DataError) as info:
        repeat(data, out, times=3)
    assert f"{data}: record 2" in str(info.value) and expect in str(info.value), str(info.value)
    assert not out.exists() and not list(folder.glob(".out.*"))


def test_repeat_as_the_tutorial_does_and_shuffled(folder):
    data = write(folder / "unique_data.json", [rec(), rec("blue.png", a="Blue.")])
    out = folder / "repeated_data.json"
    r = subprocess.run([sys.executable, "-m", "training.data.llava", "repeat", "-i", str(data), "-o", str(out),
                        "-n", "200"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert len(rows) == 400 and len({r["id"] for r in rows}) == 400
    repeat(data, folder / "a.json", size=7, shuffle=True, seed=3)
    repeat(data, folder / "b.json", size=7, shuffle=True, seed=3)
    a = json.loads((folder / "a.json").read_text(encoding="utf-8"))
    assert a == json.loads((folder / "b.json").read_text(encoding="utf-8")) and len(a) == 7
    assert len(load(folder / "a.json")) == 7


def test_validate_cli_exits_non_zero_with_one_line(folder):
    data = write(folder / "d.json", [rec("missing.png")])
    r = subprocess.run([sys.executable, "-m", "training.data.llava", "validate", str(data)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "record 1" in r.stderr


def test_a_sheet_of_image_question_answer_becomes_llava_records(folder):
    sheet = folder / "qa.csv"
    sheet.write_text("image,question,answer\nred.png,What colour is the square?,Red.\n\nblue.png,And this one?,Blue.\n",
                     encoding="utf-8")
    out = folder / "data.json"
    assert "2 records" in from_sheet(sheet, out)
    rows = load(out)
    assert rows[1]["conversations"][0]["value"] == "<image>\nAnd this one?" and rows[1]["image"] == "blue.png"
    sheet.write_text("image,question,answer\nmissing.png,q,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qa.csv:2: image missing.png"):
        from_sheet(sheet, folder / "x.json")
    assert not (folder / "x.json").exists()
