"""`xtuner` as the tutorials type it, with real exit codes.

    xtuner train WORK/config.py [--work-dir DIR] [--deepspeed deepspeed_zero2]
    xtuner convert pth_to_hf CONFIG PTH OUT [--safe-serialization]
    xtuner convert merge BASE ADAPTER OUT [--device cpu]
    xtuner chat MODEL [--adapter DIR] [--prompt-template NAME]
    xtuner list-cfg [-p PATTERN] | copy-cfg NAME DIR | ...

XTuner's own `xtuner` runs each tool as `python TOOL` with whichever python is first on PATH
and exits 0 even when the tool failed (a missing config, a crash at step 1). This command finds
the same tool and runs it from the training environment's interpreter, with our CPU shims, and
exits with the tool's own status. scripts/setup_train_env.sh installs it as
.venv-train/bin/xtuner; NPROC_PER_NODE=N launches train under torchrun, as XTuner does.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def tool_module(args: list[str]) -> tuple[str, list[str]] | None:
    """(xtuner.tools module, its arguments) for an xtuner command line, or None."""
    import xtuner
    from xtuner import entry_point

    # XTuner's own table: mode -> function giving the tool's file (or a dict for convert ...)
    table = getattr(entry_point, "modes", None) or dict(zip(entry_point.MODES, entry_point.MAP_FILE_FUNCS))
    if not args or args[0] not in table:
        return None
    found, rest = table[args[0]], args[1:]
    if isinstance(found, dict):  # convert / preprocess have a second word
        if not rest or rest[0] not in found:
            return None
        found, rest = found[rest[0]], rest[1:]
    path = Path(found()).with_suffix("")
    module = ".".join(path.relative_to(Path(xtuner.__file__).parent.parent).parts)
    return module, rest


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    found = tool_module(args)
    if found is None:  # help, or a mode XTuner does not have: its own message
        from xtuner.entry_point import cli

        sys.argv = ["xtuner", *args]
        cli()
        return 2
    module, rest = found
    nproc = int(os.environ.get("NPROC_PER_NODE", "1") or 1)
    if module.endswith(".train") and nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "-m", "training.xtuner_tool", module, *rest, "--launcher", "pytorch"]
    else:
        cmd = [sys.executable, "-m", "training.xtuner_tool", module, *rest]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
