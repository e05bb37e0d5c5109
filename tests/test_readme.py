"""The README's serving sections name only flags that exist where they say (it once listed
`--api-key` among the engine settings the app takes; the app's flag is `--api-api-key`)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
FLAG = r"(?<![\w-])--[a-z][a-z0-9-]+"


def section(start: str, end: str) -> str:
    text = README[README.index(start):README.index(end)]
    return "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("docker"))


def flags_of(*cmd: str) -> set[str]:
    out = subprocess.run([sys.executable, *cmd, "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return set(re.findall(FLAG, out))


@pytest.mark.parametrize("start,end,cmds", [
    ("## The chat app", "## The inference engine", [["app.py"], ["-m", "chat_ui.export_feedback"]]),
    ("## The inference engine", "### OpenAI-compatible server", [["app.py"]]),  # engine flags: the app's too
    ("### OpenAI-compatible server", "Terminal chat", [["-m", "infer_engine.server"]]),
    ("Terminal chat", "What one hostile request", [["-m", "infer_engine.chat"]]),
    ("What one hostile request", "### Benchmark", [["scripts/bench_hostile.py"]]),
])
def test_every_flag_the_readme_names_exists(start, end, cmds):
    named = set(re.findall(FLAG, section(start, end)))
    assert named, f"no flags found between {start!r} and {end!r}"
    known = set().union(*(flags_of(*cmd) for cmd in cmds))
    assert not named - known, sorted(named - known)
