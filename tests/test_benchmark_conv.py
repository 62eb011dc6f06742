"""The conv preset of the benchmark (sm3fn/benchmark_conv.py): its shapes, and a run on small ones."""

import math

import torch

from sm3fn import benchmark_conv


def test_resnet50_shapes_add_up_to_torchvisions_parameter_count():
    shapes = benchmark_conv.resnet50_shapes()
    assert len(shapes) == 161 and sum(math.prod(s) for s in shapes) == 25_557_032  # torchvision resnet50
    assert sum(len(s) == 4 for s in shapes) == 53


def test_params_keep_their_memory_format(monkeypatch):
    monkeypatch.setattr(benchmark_conv, "conv_shapes", lambda: [(8, 4, 3, 3), (6, 4, 3, 3, 3), (8,), (4, 3, 5)])
    params = benchmark_conv.make_params(channels_last=True, dtype=torch.bfloat16)
    assert [p.dim() for p in params] == [4, 5, 1, 3]
    for p in params:
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
            assert p.grad.stride() == p.stride()
        if p.dim() == 5:
            assert p.is_contiguous(memory_format=torch.channels_last_3d)


def test_preset_runs_and_prints_ratios(monkeypatch):
    monkeypatch.setattr(benchmark_conv, "conv_shapes", lambda: [(8, 4, 3, 3), (8,), (6, 1, 3, 3), (4, 3, 5)])
    lines = []
    results = benchmark_conv.run(2, ["float32"], ["channels_last"], log=lines.append)
    rows = results[0]["rows"]
    assert set(rows) == {"whole network", "(8, 4, 3, 3)", "(6, 1, 3, 3)", "(4, 3, 5)"}
    for row in rows.values():
        assert row["sm3fn fused"]["x_adam"][1] > 0 and row["Adam fused"]["median_ms"] > 0
    assert "whole network" in lines[0] and "channels_last" in lines[0]
