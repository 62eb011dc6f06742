"""benchmarks/optimizer_study.py --quick runs end to end (a few steps, tiny models, both tasks)."""

import glob
import importlib.util
import json
import math
import os
import sys

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study():
    path = os.path.join(ROOT, "benchmarks", "optimizer_study.py")
    spec = importlib.util.spec_from_file_location("optimizer_study", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["optimizer_study"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_study_writes_finite_results(tmp_path):
    study = _study()
    out = str(tmp_path / "study")
    study.main(["--quick", "--out", out, "--warmup-check", "--refine"])

    for name in ("study_table.md", "summary.json", "config.json", "study_lm.png", "study_lr_lm.png",
                 "study_digits.png", "study_lr_digits.png", "study_momentum.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name

    runs = [json.load(open(p)) for p in glob.glob(os.path.join(out, "runs", "*", "*.json"))]
    assert {r["task"] for r in runs} == {"lm", "digits"}
    assert {r["opt"] for r in runs} == set(study.OPTIMIZERS)
    assert {r["phase"] for r in runs} == {"grid", "seeds", "momentum", "warmup", "refine"}
    for r in runs:
        res = r["result"]
        assert res["steps"] == len(res["train_loss"]), r["opt"]
        assert all(math.isfinite(v) for v in res["train_loss"]), r["opt"]
        assert all(math.isfinite(e["loss"]) for e in res["evals"]), r["opt"]
        assert res["state_bytes"] > 0

    summary = json.load(open(os.path.join(out, "summary.json")))
    for task in ("lm", "digits"):
        for opt in study.OPTIMIZERS:
            s = summary[task][opt]
            assert s["final_loss"]["n"] == 3  # seed 0 from the grid, seeds 1 and 2 at the best lr
            assert math.isfinite(s["final_loss"]["mean"])
    # SM3 without momentum keeps no more state than Adafactor; with momentum it keeps a full-size buffer
    lm = summary["lm"]
    assert lm["SM3"]["state_bytes"] <= lm["Adafactor"]["state_bytes"] < lm["Adagrad"]["state_bytes"]
    assert lm["SM3 m=0.9"]["state_bytes"] > lm["Adagrad"]["state_bytes"]
    assert lm["Adam"]["state_bytes"] == 2 * lm["Adagrad"]["state_bytes"]
