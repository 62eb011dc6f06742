"""The package builds as a wheel and an sdist that ship every module and the type marker;
every public module has an ``__all__`` of its own names."""

import importlib
import pkgutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import sm3fn

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


TYPE_ALIASES = {"OptState", "Tree", "Schedule", "ScalarOrSchedule", "Mask", "Labels", "Path", "Template",
                "TransformOrFactory", "Step", "Value"}


def _modules():
    """sm3fn's public modules (no ``_`` in the dotted name: the private ones export nothing)."""
    yield sm3fn
    for info in pkgutil.walk_packages(sm3fn.__path__, "sm3fn."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield importlib.import_module(info.name)


@pytest.mark.parametrize("module", list(_modules()), ids=lambda m: m.__name__)
def test_every_module_has_an_all_of_its_own_names(module):
    assert hasattr(module, "__all__"), module.__name__
    for name in module.__all__:
        value = getattr(module, name)  # every exported name exists
        owner = getattr(value, "__module__", None)
        # nothing re-exported from torch, typing, tensordict, numbers ...
        if name in TYPE_ALIASES or isinstance(value, str):  # OptState = TensorDictBase; PARAM = "*"
            continue
        if isinstance(value, type(sm3fn)):
            assert value.__name__.startswith("sm3fn"), (module.__name__, name)
        else:
            assert owner is not None and owner.startswith("sm3fn"), (module.__name__, name, owner)


def test_top_level_exports_the_new_names():
    for name in ("MultiSteps", "zero_nans", "clip", "set_to_zero", "freeze", "tree"):
        assert name in sm3fn.__all__ and hasattr(sm3fn, name)
