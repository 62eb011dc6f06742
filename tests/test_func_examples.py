"""The meta-learning examples run end to end (a few meta-steps, so they cannot rot)."""

import os
import runpy
import sys


EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def run_example(name, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(os.path.join(EXAMPLES, name), run_name="__main__")


def test_maml_sinusoid_runs_and_plots(tmp_path, monkeypatch, capsys):
    out = tmp_path / "fits.png"
    run_example("maml_sinusoid.py", ["--meta-steps", "3", "--meta-batch", "4", "--test-tasks", "3", "--plot", str(out)], monkeypatch)
    text = capsys.readouterr().out
    assert "before meta-training" in text and "after meta-training" in text
    assert out.stat().st_size > 10_000


def test_meta_learn_lr_runs(monkeypatch, capsys):
    run_example("meta_learn_lr.py", ["--meta-steps", "2", "--inner-steps", "3"], monkeypatch)
    text = capsys.readouterr().out
    assert "initial" in text and "learned" in text
