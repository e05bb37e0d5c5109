"""Data tools and the validator on good and bad files (runs in the training environment).
Each bad file gives one clear error line naming the place and leaves no output file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from training.data.convert import convert_sheet
from training.data.io import DataError
from training.data.validate import validate

GOOD = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}]


def jsonl(path: Path, rows, extra_lines=()) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"training.data.{module}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def assert_one_error_line(r: subprocess.CompletedProcess, *parts: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_good_file_validates(tmp_path):
    r = validate(jsonl(tmp_path / "d.jsonl", GOOD))
    assert (r.samples, r.turns) == (2, 3)


@pytest.mark.parametrize("bad,where", [
    ('{"messages": [', "d.jsonl:3: invalid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}),
     "d.jsonl:3: messages[1].role: unknown role 'bot'"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
     "d.jsonl:3: messages[1].content: empty assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "d.jsonl:3: messages: must end with an assistant"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "d.jsonl:3: messages[0].role: expected user"),
    (json.dumps({"conversation": []}), "d.jsonl:3: conversation: missing or empty"),
    (json.dumps({"text": "hi"}), "d.jsonl:3: messages: missing (expected {\"messages\": [...]} or {\"conversation\": [...]}, found an object with keys text)"),
])
def test_bad_samples_name_file_line_and_field(tmp_path, bad, where):
    f = jsonl(tmp_path / "d.jsonl", GOOD, [bad])
    with pytest.raises(DataError) as err:
        validate(f)
    assert str(err.value).startswith(str(tmp_path / where)) or where in str(err.value)
    assert_one_error_line(cli("validate", f), where)


def test_gbk_file_is_named_with_a_fix(tmp_path):
    f = tmp_path / "gbk.jsonl"
    f.write_bytes(json.dumps(GOOD[0], ensure_ascii=False).replace('"q"', '"你好"').encode("gbk") + b"\n")
    f.write_bytes(b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                  + json.dumps({"messages": [{"role": "user", "content": "你好"},
                                             {"role": "assistant", "content": "好"}]}, ensure_ascii=False).encode("gbk"))
    assert_one_error_line(cli("validate", f), "gbk.jsonl:2: not UTF-8", "GBK", "iconv")


def test_over_length_sample_reports_token_count(tmp_path, tiny_model):
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "a"}]}
    f = jsonl(tmp_path / "d.jsonl", [GOOD[0], long])
    assert_one_error_line(cli("validate", f, "--tokenizer", tiny_model, "--max-length", 128),
                          "d.jsonl:2: messages:", "tokens, more than max_length 128")


def test_self_cognition_generator(tmp_path):
    out = tmp_path / "self.jsonl"
    r = cli("generate_self_cognition", "--name", "小明", "--description", "由测试实验室打造的助手",
            "--repeat", 2, "--system", "你是小明", "--mix", ROOT / "training/data/general_chat.jsonl",
            "--mix-ratio", 0.25, "--out", out)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    identity = [x for x in rows if any("小明" in m["content"] for m in x["messages"] if m["role"] == "assistant")]
    assert len(identity) == 2 * 20 and len(rows) - len(identity) == round(40 * 0.25 / 0.75)
    assert all(x["messages"][0] == {"role": "system", "content": "你是小明"} for x in identity)
    assert any(x["messages"][1]["content"] == "Who are you?" for x in identity)
    validate(out)


def test_generator_refuses_bad_mix_file_and_writes_nothing(tmp_path):
    bad = jsonl(tmp_path / "mix.jsonl", GOOD, ["not json"])
    out = tmp_path / "self.jsonl"
    assert_one_error_line(cli("generate_self_cognition", "--name", "x", "--mix", bad, "--out", out),
                          "mix.jsonl:3: invalid JSON")
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def make_xlsx(path: Path, header, rows) -> Path:
    from openpyxl import Workbook
    wb = Workbook()
    ws = wb.active
    ws.append(header)
    for r in rows:
        ws.append(r)
    wb.save(path)
    return path


def test_xlsx_sheet_with_question_template(tmp_path):
    x = make_xlsx(tmp_path / "qa.xlsx", ["病症", "症状", "回答"],
                  [["感冒", "发烧", "多喝水，注意休息"], [None, None, None], ["咳嗽", "喉咙痛", "少说话"]])
    out = tmp_path / "out.jsonl"
    r = cli("convert", "sheet", x, out, "--question", "{病症}：{症状}", "--answer", "回答", "--system", "你是医生")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["messages"] == [{"role": "system", "content": "你是医生"},
                                   {"role": "user", "content": "感冒：发烧"},
                                   {"role": "assistant", "content": "多喝水，注意休息"}]
    assert len(rows) == 2


def test_wrong_xlsx_column_names_it_and_writes_nothing(tmp_path):
    x = make_xlsx(tmp_path / "qa.xlsx", ["问题", "回答"], [["a", "b"]])
    out = tmp_path / "out.jsonl"
    assert_one_error_line(cli("convert", "sheet", x, out, "--question", "{问题}", "--answer", "答案"),
                          "qa.xlsx: column '答案' not found (columns: 问题, 回答)")
    assert not out.exists()


def test_empty_answer_cell_names_the_row(tmp_path):
    x = make_xlsx(tmp_path / "qa.xlsx", ["问题", "回答"], [["a", "b"], ["c", None]])
    with pytest.raises(DataError, match=r"qa\.xlsx:3: column '回答': empty cell"):
        convert_sheet(x, "{问题}", "回答")


def test_csv_and_gbk_csv(tmp_path):
    good = tmp_path / "qa.csv"
    good.write_text("问题,回答\n你好,你好呀\n", encoding="utf-8")
    assert convert_sheet(good, "{问题}", "回答")[0]["messages"][1]["content"] == "你好呀"
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes("问题,回答\n你好,你好呀\n".encode("gbk"))
    out = tmp_path / "out.jsonl"
    assert_one_error_line(cli("convert", "sheet", gbk, out, "--question", "{问题}", "--answer", "回答"),
                          "gbk.csv:1: not UTF-8", "GBK")
    assert not out.exists()


def test_alpaca_and_xtuner_formats(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "翻译", "input": "hello", "output": "你好"},
                                  {"instruction": "1+1", "input": "", "output": "2"}]), encoding="utf-8")
    out = tmp_path / "a.jsonl"
    assert cli("convert", "alpaca", alpaca, out).returncode == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["messages"][0] == {"role": "user", "content": "翻译\nhello"}
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": ""}]), encoding="utf-8")
    assert_one_error_line(cli("convert", "alpaca", bad, tmp_path / "b.jsonl"), "b.json: record 1: output: empty answer")
    xt = jsonl(tmp_path / "x.jsonl", [{"conversation": [{"system": "s", "input": "q", "output": "a"},
                                                        {"input": "q2", "output": "a2"}]}])
    out = tmp_path / "x_out.jsonl"
    assert cli("convert", "xtuner", xt, out).returncode == 0
    msgs = json.loads(out.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]


def test_replace_changes_contents_only(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "机智流是谁"},
                                                     {"role": "assistant", "content": "我是机智流助手"}]}])
    r = cli("replace", src, src, "--old", "机智流", "--new", "小明", "--roles", "assistant")
    assert r.returncode == 0 and "1 replacements" in r.stdout
    msgs = json.loads(src.read_text(encoding="utf-8"))["messages"]
    assert msgs[0]["content"] == "机智流是谁" and msgs[1]["content"] == "我是小明助手"
    assert_one_error_line(cli("replace", src, tmp_path / "o.jsonl", "--old", "a", "--new", "b", "--roles", "bot"),
                          "roles: unknown role 'bot'")


def test_self_cognition_asks_on_later_turns_and_mixes_no_identity_answers(tmp_path):
    from training.data.generate_self_cognition import asks_identity, generate

    general = [{"messages": [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是一个人工智能助手"}]},
               {"messages": [{"role": "user", "content": "1加1等于几？"}, {"role": "assistant", "content": "2"}]}]
    rows = generate("小明", "助手", repeat=5, mix_rows=general, mix_ratio=0.3, later_turn_ratio=0.5)
    identity = [r for r in rows if asks_identity(r)]
    asked_at = [next(i for i, m in enumerate(r["messages"]) if asks_identity({"messages": [m]})) for r in identity]
    # every identity answer is the new one
    assert all("小明" in r["messages"][i + 1]["content"] for r, i in zip(identity, asked_at))
    assert any(i == 2 for i in asked_at)  # some asked on turn 2
    # some go on after the name with a general question, answered as the mix answers it
    after = [r["messages"][i + 2:] for r, i in zip(identity, asked_at) if len(r["messages"]) > i + 2]
    assert after and all([m["content"] for m in rest] == ["1加1等于几？", "2"] for rest in after)
    assert not any(m["content"] == "我是一个人工智能助手" for r in rows for m in r["messages"])  # the old answer is not mixed in


@pytest.mark.parametrize("turn,message", [
    ({"system": "s", "input": {"text": "你是谁"}, "output": "我是小明"},
     "record 1: conversation[0].input: must be a string, got an object with keys text"),
    ({"input": "多少岁", "output": 37}, "record 1: conversation[0].output: must be a string, got the number 37 "
                                       "(put it in quotes: the answer is text)"),
    ({"input": " ", "output": "a"}, "record 1: conversation[0].input: empty"),
])
def test_xtuner_files_get_errors_in_their_own_fields(tmp_path, turn, message):
    """The camp's assistant_Tuner.jsonl (an input that is an object) and the xlsx script's
    "output": 37 were reported as messages[1].content, a field not in the user's file."""
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"conversation": [turn]}], ensure_ascii=False), encoding="utf-8")
    for tool in (("validate", f), ("convert", "xtuner", f, tmp_path / "o.jsonl"),
                 ("replace", f, tmp_path / "o.jsonl", "--old", "小", "--new", "大")):
        assert_one_error_line(cli(*tool), message)
    assert not (tmp_path / "o.jsonl").exists()


def test_the_camps_change_script_output_goes_through_replace(tmp_path):
    """change_script.py writes each record back with json.dumps (XTuner conversations, JSONL)."""
    rec = {"conversation": [{"system": "Role: 尖米的智能助手", "input": "你是谁", "output": "我是尖米的智能助手"}]}
    f = tmp_path / "assistant_Tuner_change.jsonl"
    f.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    r = cli("replace", f, tmp_path / "o.jsonl", "--old_text", "尖米", "--new_text", "小明")
    assert r.returncode == 0 and "1 samples, 2 replacements" in r.stdout


def test_an_empty_file_is_refused_not_written_as_zero_samples(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert_one_error_line(cli("convert", "xtuner", empty, tmp_path / "o.jsonl"), "no samples")
    assert_one_error_line(cli("replace", empty, tmp_path / "o.jsonl", "--old", "a", "--new", "b"), "no samples")
    assert not (tmp_path / "o.jsonl").exists()


# issue 22, 8: the data tools' memory and what they run

def test_a_sheet_declaring_a_huge_range_is_refused_before_it_is_read(tmp_path):
    import re
    import zipfile

    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.append(["问题", "回答"])
    ws.append(["q", "a"])
    good = tmp_path / "good.xlsx"
    wb.save(good)
    bad = tmp_path / "huge.xlsx"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = re.sub(rb'<dimension ref="[^"]+"', b'<dimension ref="A1:XFD1048576"', data)
            zout.writestr(item, data)
    assert_one_error_line(cli("convert", "sheet", bad, tmp_path / "o.jsonl", "--question", "{问题}", "--answer", "回答"),
                          "the sheet declares 1,048,576 rows x 16,384 columns")
    assert not (tmp_path / "o.jsonl").exists()


def test_a_sheet_part_that_unpacks_too_large_is_refused(tmp_path, monkeypatch):
    import training.data.convert as convert
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.append(["问题", "回答"])
    ws.append(["q", "a" * 5000])  # one huge cell (5 GB in the finding; 5,000 characters over a 2,000-byte cap here)
    f = tmp_path / "cell.xlsx"
    wb.save(f)
    monkeypatch.setattr(convert, "MAX_XLSX_PART_BYTES", 2000)
    with pytest.raises(DataError, match="unpacks to .* MB, more than"):
        convert.convert_sheet(f, "{问题}", "回答")


def test_long_lines_devices_deep_json_and_huge_numbers_are_one_line_each(tmp_path, monkeypatch):
    import training.data.io as io_mod

    for name, content, words in (("deep.jsonl", "[" * 100_000 + "]" * 100_000, "nested too deep"),
                                 ("num.jsonl", '{"messages": ' + "9" * 100_000 + "}", "a value that cannot be read")):
        (tmp_path / name).write_text(content + "\n", encoding="utf-8")
        assert_one_error_line(cli("validate", tmp_path / name), words)
    assert_one_error_line(cli("validate", "/dev/zero"), "not a regular file")
    monkeypatch.setattr(io_mod, "MAX_LINE_BYTES", 1000)
    long = jsonl(tmp_path / "long.jsonl", GOOD, [json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]})])
    with pytest.raises(DataError, match=r"long.jsonl:3: a line over"):
        validate(long)


def test_out_through_a_symlink_or_to_stdout_is_written_through(tmp_path):
    src = jsonl(tmp_path / "d.jsonl", GOOD)
    r = cli("replace", src, "/dev/stdout", "--old", "q", "--new", "Q")
    assert r.returncode == 0 and '"Q1"' in r.stdout  # written to stdout itself
    import os
    assert os.path.islink("/dev/stdout")  # not replaced by a regular 0600 file
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert cli("replace", src, link, "--old", "q", "--new", "Q").returncode == 0
    assert link.is_symlink() and '"Q1"' in target.read_text()


def test_validate_runs_no_code_from_a_tokenizer_folder_unless_asked(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EvilTokenizer",
                                                              "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = cli("validate", jsonl(tmp_path / "d.jsonl", GOOD), "--tokenizer", folder)
    assert r.returncode != 0 and not marker.exists()
    assert "--trust-remote-code" in r.stderr
