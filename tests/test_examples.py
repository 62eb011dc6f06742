"""The examples run end to end (a few steps each) and write what they promise."""

import os
import runpy
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, args, monkeypatch, capsys):
    """Runs an example in this process (torch is already imported) and returns its stdout."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(os.path.join(ROOT, "examples", script), run_name="__main__")
    return capsys.readouterr().out


@pytest.mark.slow
def test_functional_digits_reports_both_accuracies(monkeypatch, capsys):
    pytest.importorskip("sklearn")
    out = _run("functional_digits.py", ["--steps", "30"], monkeypatch, capsys)
    assert "(final parameters)" in out and "(parameter EMA" in out


def _git_status() -> str:
    """``git status --porcelain`` of the checkout (skips where there is no git checkout)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot check that the checkout stays clean")
    done = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    return done.stdout


@pytest.mark.slow
def test_char_lm_writes_its_plots_to_an_ignored_directory(monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    before = _git_status()
    out = _run("char_lm.py", ["--steps", "4", "--eval-every", "2"], monkeypatch, capsys)  # the default --out
    for name in ("char_lm_loss.png", "char_lm_memory.png"):
        path = os.path.join(ROOT, "examples", "out", name)
        assert f"wrote {path}" in out and os.path.getsize(path) > 1000
    assert out.count("optimizer state") == 4
    assert _git_status() == before  # tracked figures untouched, nothing new to commit


def test_example_outputs_are_git_ignored():
    _git_status()  # skips without a checkout
    for path in ("examples/out/char_lm_loss.png", "examples/out/maml_sinusoid.png", "benchmarks/out/x.txt"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


@pytest.mark.slow
def test_train_regular_runs_the_drop_in_loop(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    out = _run("train_regular.py", ["--epochs", "1"], monkeypatch, capsys)
    assert "accuracy" in out.lower()


@pytest.mark.slow
def test_sparse_bag_of_words_reports_memory(monkeypatch, capsys):
    out = _run("sparse_bag_of_words.py", [], monkeypatch, capsys)
    assert "MiB" in out


def test_maml_sinusoid_runs_and_plots(tmp_path, monkeypatch, capsys):
    """The meta-learning examples run a few meta-steps, so they cannot rot."""
    out = tmp_path / "fits.png"
    text = _run("maml_sinusoid.py", ["--meta-steps", "3", "--meta-batch", "4", "--test-tasks", "3", "--plot", str(out)],
                monkeypatch, capsys)
    assert "before meta-training" in text and "after meta-training" in text
    assert out.stat().st_size > 10_000


def test_meta_learn_lr_runs(monkeypatch, capsys):
    text = _run("meta_learn_lr.py", ["--meta-steps", "2", "--inner-steps", "3"], monkeypatch, capsys)
    assert "initial" in text and "learned" in text
