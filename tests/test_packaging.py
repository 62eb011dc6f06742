"""The package builds as a wheel and an sdist that ship every module and the type marker."""

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_and_sdist_contents(tmp_path):
    pytest.importorskip("build", reason="the 'build' package is part of the test extra")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("sm3fn-*.whl"))
    sdist = next(tmp_path.glob("sm3fn-*.tar.gz"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "sm3fn").rglob("*.py")}
    assert sources <= names
    assert "sm3fn/py.typed" in names
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert "pyproject.toml" in members and "README.md" in members
    assert sources <= members
