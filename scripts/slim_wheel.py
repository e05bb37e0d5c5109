"""Rewrite a wheel in place without the files a host cannot use (e.g. bitsandbytes' binaries for
other CUDA versions), its RECORD updated so pip installs it as usual.

    python scripts/slim_wheel.py WHEEL --drop REGEX [--keep REGEX]

A member whose name matches --drop goes, unless it also matches --keep.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import zipfile


def slim(wheel: str, drop: str, keep: str | None) -> tuple[int, int]:
    gone = lambda name: re.search(drop, name) and not (keep and re.search(keep, name))  # noqa: E731
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        dropped = {n for n in names if gone(n)}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(wheel)), suffix=".whl")
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
                for info in src.infolist():
                    if info.filename in dropped:
                        continue
                    data = src.read(info.filename)
                    if info.filename == record:
                        lines = data.decode().splitlines()
                        data = ("\n".join(ln for ln in lines if ln.split(",", 1)[0] not in dropped) + "\n").encode()
                    dst.writestr(info, data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, wheel)
        except BaseException:
            os.unlink(tmp)
            raise
    return len(dropped), len(names) - len(dropped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel")
    p.add_argument("--drop", required=True)
    p.add_argument("--keep")
    a = p.parse_args()
    dropped, kept = slim(a.wheel, a.drop, a.keep)
    print(f"{a.wheel}: dropped {dropped} files, kept {kept}")


if __name__ == "__main__":
    main()
