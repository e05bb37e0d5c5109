"""Run one of XTuner's tools with our compatibility shims, from this interpreter:

    python -m training.xtuner_tool train CONFIG --work-dir DIR
    python -m training.xtuner_tool pth_to_hf CONFIG PTH OUT --safe-serialization
    python -m training.xtuner_tool merge BASE ADAPTER OUT --device cpu

The `xtuner` CLI runs each tool with whichever `python` is first on PATH and always exits 0
(even for a missing config); calling the modules directly gives real exit codes.
"""
from __future__ import annotations

import runpy
import sys

from . import compat

TOOLS = {"train": "xtuner.tools.train",
         "pth_to_hf": "xtuner.tools.model_converters.pth_to_hf",
         "merge": "xtuner.tools.model_converters.merge",
         "chat": "xtuner.tools.chat"}


def main() -> None:
    if len(sys.argv) < 2 or not (sys.argv[1] in TOOLS or sys.argv[1].startswith("xtuner.tools.")):
        sys.exit(f"usage: python -m training.xtuner_tool {{{','.join(TOOLS)}|xtuner.tools.MODULE}} ARGS...")
    module = TOOLS.get(sys.argv[1], sys.argv[1])
    compat.apply()
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
