"""The benchmarks run end to end (smoke tests: figures live in their output, not in asserts)."""

import os
import runpy
import sys

import pytest

from sm3fn import benchmark


@pytest.mark.slow
def test_benchmark_quick_runs(tmp_path, capsys):
    png = tmp_path / "bench.png"
    results = benchmark.main(["--quick", "--plot", str(png)])
    out = capsys.readouterr().out
    assert png.stat().st_size > 0
    rows = results[0]["rows"]
    for name in ("sm3fn m=0 fused", "sm3fn m=0 blocked", "sm3fn m=0.9 fused", "sm3fn m=0.9 blocked",
                 "sm3fn pure m=0", "sm3fn pure m=0.9", "Adam fused", "Adam foreach", "Adagrad", "Adafactor"):
        assert name in rows and name in out
        assert rows[name]["median_ms"] > 0
    # SM3's state is its accumulators (+ step counters; no momentum buffer at momentum 0)
    minimum = results[0]["sm3_min_state_bytes"]
    for kernel in ("fused", "blocked"):
        assert minimum <= rows[f"sm3fn m=0 {kernel}"]["state_bytes"] <= 1.05 * minimum
    assert "functional / plain loop" in out
    # the pure rows keep the same state as the optimizer: accumulators (+ the buffer with momentum)
    assert minimum <= rows["sm3fn pure m=0"]["state_bytes"] <= 1.05 * minimum


@pytest.mark.slow
def test_pure_breakdown_runs():
    result = benchmark.bench_pure_breakdown("tiny", 2)
    assert set(result["rows"]) >= {"pure step m=0", "  tx.update alone", "  apply_updates alone",
                                   "write fresh, 4 KiB pages", "write fresh, huge pages", "Adam fused"}
    assert "pure step breakdown" in benchmark.format_breakdown(result)


def test_gpt2_preset_sizes():
    n = {k: sum(_numel(s) for s in benchmark.gpt2_shapes(*v).values()) for k, v in benchmark.PRESETS.items()}
    assert 15e6 < n["16m"] < 17e6
    assert 123e6 < n["124m"] < 125e6  # GPT-2 small with its head tied to wte


def _numel(shape):
    out = 1
    for n in shape:
        out *= n
    return out


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _run_script(script, args, monkeypatch):
    """Runs a script of benchmarks/ in this process (torch is already imported)."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    return runpy.run_path(os.path.join(BENCHMARKS, script), run_name="__main__")


@pytest.mark.slow
def test_sparse_step_prints_and_saves_its_ratio(tmp_path, monkeypatch, capsys):
    _run_script("sparse_step.py", ["--rows", "20000", "--repeats", "2", "--out", str(tmp_path)], monkeypatch)
    out = capsys.readouterr().out
    assert "sparse step / dense step" in out
    saved = (tmp_path / "sparse_step_output.txt").read_text()
    assert "sparse step / dense step" in saved and saved in out


def test_optimizer_step_saves_the_output_and_plot_where_asked(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_main(argv):  # the measurement itself is test_benchmark_quick_runs's
        calls.append(argv)
        print("a table")
        return ["results"]

    monkeypatch.setattr(benchmark, "main", fake_main)
    _run_script("optimizer_step.py", ["--quick", "--out", str(tmp_path)], monkeypatch)
    _run_script("optimizer_step.py", ["--quick", "--out", str(tmp_path / "b"), "--plot", "x.png"], monkeypatch)
    assert calls == [["--quick", "--plot", str(tmp_path / "benchmark.png")], ["--quick", "--plot", "x.png"]]
    assert (tmp_path / "benchmark_output.txt").read_text() == "a table\n"
    assert (tmp_path / "b" / "benchmark_output.txt").read_text() == "a table\n"
    assert capsys.readouterr().out.count("a table") == 2


def test_step_peak_bytes_keeps_kineto_lines_off_stderr(capfd):
    import torch

    peak = benchmark.step_peak_bytes(lambda: torch.ones(1000) * 2)
    assert peak >= 4000  # two float32 tensors of 1000, one live at a time at least
    print("after", file=sys.stderr)  # stderr works again after the block
    err = capfd.readouterr().err
    assert "USDT" not in err and "profiler_start" not in err
    assert "after" in err


def test_layout_overhead_prints_per_tensor_and_preset_figures(monkeypatch, capsys):
    """The script behind docs/speed.md's layout-step figures runs, restores sweep_, prints its figures."""
    from sm3fn._kernels import fused_cpu

    sweep = fused_cpu.sweep_
    _run_script("layout_overhead.py", [], monkeypatch)
    out = capsys.readouterr().out
    assert fused_cpu.sweep_ is sweep  # the timing wrapper is taken off again
    assert "(1024, 256, 1, 1)" in out and "layout (sweep_ less kernel)" in out
