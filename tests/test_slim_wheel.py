"""scripts/slim_wheel.py: the GPU wheel set keeps only the binaries the host can load, and the
rewritten wheel still installs (its RECORD lists exactly what is left)."""
from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_dropped_binaries_leave_an_installable_wheel(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {"pkg/__init__.py": "X = 1\n", "pkg/lib_cpu.so": "c", "pkg/lib_cuda118.so": "a", "pkg/lib_cuda130.so": "b",
             "pkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n",
             "pkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in {**files, "pkg-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    out = subprocess.run([sys.executable, ROOT / "scripts/slim_wheel.py", wheel, "--drop", r"lib_.*\.so$",
                          "--keep", r"lib_(cpu|cuda13\d)\.so$"], capture_output=True, text=True, check=True).stdout
    assert "dropped 1 files" in out
    with zipfile.ZipFile(wheel) as z:
        assert "pkg/lib_cuda118.so" not in z.namelist() and "pkg/lib_cuda130.so" in z.namelist()
        assert "lib_cuda118" not in z.read("pkg-1.0.dist-info/RECORD").decode()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                    tmp_path / "site", wheel], check=True)
    assert sorted(p.name for p in (tmp_path / "site" / "pkg").glob("*.so")) == ["lib_cpu.so", "lib_cuda130.so"]
