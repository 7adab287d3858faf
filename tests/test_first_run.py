"""effrun with no arguments: the whole study on built-in data (about a minute: slow)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_first_run_shows_the_whole_study(tmp_path):
    res = run_cli([], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "default").iterdir()
    rows = json.loads((run_dir / "summary.json").read_text())["records"]
    train, prune, distill, quantize = rows
    assert [r["stage"] for r in rows] == ["train", "prune", "distill", "quantize"]
    assert 0.5 < train["accuracy"] < 0.9, "learnable, not trivially separable"
    assert prune["flops"] <= 0.55 * train["flops"] and distill["flops"] < prune["flops"]
    assert quantize["weight_bytes"] < 0.3 * distill["weight_bytes"]
    assert abs(quantize["accuracy"] - distill["accuracy"]) < 0.02, "int8 keeps accuracy"
    assert len({round(r["accuracy"], 3) for r in rows[:3]}) == 3, "stages differ in accuracy"
    assert quantize["latency_mode"] == "compiled" and quantize["vs_reference"]["ratios"]
    assert "quantize: latency / its parent's" in res.stdout
