"""The examples run end to end (a few steps each) and write what they promise."""

import os
import runpy
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


@pytest.mark.slow
def test_char_lm_writes_its_plots(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    out = _run("char_lm.py", ["--steps", "4", "--eval-every", "2", "--out", str(tmp_path)], monkeypatch, capsys)
    for name in ("char_lm_loss.png", "char_lm_memory.png"):
        assert os.path.getsize(tmp_path / name) > 1000
    assert out.count("optimizer state") == 4


@pytest.mark.slow
def test_train_regular_runs_the_drop_in_loop(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    out = _run("train_regular.py", ["--epochs", "1"], monkeypatch, capsys)
    assert "accuracy" in out.lower()


@pytest.mark.slow
def test_sparse_bag_of_words_reports_memory(monkeypatch, capsys):
    out = _run("sparse_bag_of_words.py", [], monkeypatch, capsys)
    assert "MiB" in out
