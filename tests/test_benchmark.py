"""The benchmark runs end to end (a smoke test: figures live in its output, not in asserts)."""

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
