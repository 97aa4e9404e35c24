"""diffuse.compare: the speedup search, training budgets, and the CLI (same checkpoint → 1; AR vs diffusion)."""

from __future__ import annotations

import json

import pytest

from conftest import call_main
from diffuse.errors import DiffuseError
from diffuse.evaluation.comparison import training_budget
from diffuse.evaluation.sweep import speedup
from evaluation_runs import ckpt

QUICK = ("steps=[2,4]", "num_samples=2", "length=8", "limit_batches=1", "t_samples=1", "reference_samples=4",
         "progress=false")


def curve(*pairs, seconds_per_step=0.01):
    return [{"steps": s, "nfe": s, "gen_ppl": p, "entropy": 4.0, "seconds_per_sample": s * seconds_per_step}
            for s, p in pairs]


def test_speedup_of_a_curve_over_itself_is_one():
    a = curve((8, 90.0), (16, 60.0), (32, 50.0), (64, 49.0))
    got = speedup(a, [dict(p) for p in a])
    assert got["found"] and got["step_speedup"] == 1.0 and got["nfe_speedup"] == 1.0 and got["wall_speedup"] == 1.0


def test_speedup_is_measured_at_as_quality_bar():
    a = curve((8, 90.0), (16, 60.0), (32, 50.0), (64, 49.0))
    b = curve((2, 80.0), (4, 51.0), (8, 48.0))
    got = speedup(a, b, tolerance=0.05)  # bar 49 × 1.05 = 51.45: A clears it at 32 steps, B at 4
    assert got["bar_gen_ppl"] == pytest.approx(51.45)
    assert (got["a_steps"], got["b_steps"]) == (32, 4)
    assert got["step_speedup"] == 8.0 and got["step_speedup_vs_reference"] == 16.0
    assert got["wall_speedup"] == pytest.approx(8.0)
    strict = speedup(a, b, tolerance=0.0)  # bar 49: B needs 8 steps, A its reference 64
    assert (strict["a_steps"], strict["b_steps"], strict["step_speedup"]) == (64, 8, 8.0)
    at_32 = speedup(a, b, reference_steps=32, tolerance=0.0)  # bar 50
    assert (at_32["a_steps"], at_32["b_steps"]) == (32, 8)


def test_speedup_says_when_b_never_gets_there_and_flags_lower_entropy():
    a = curve((8, 50.0), (16, 40.0))
    never = speedup(a, curve((8, 70.0), (16, 60.0)))
    assert not never["found"] and "never reaches" in never["reason"]
    b = curve((4, 39.0))
    b[0]["entropy"] = 2.0
    assert speedup(a, b)["b_less_diverse"] is True
    with pytest.raises(DiffuseError, match="reference_steps=12"):
        speedup(a, b, reference_steps=12)
    assert speedup(a, [{**p, "gen_ppl": None} for p in b])["found"] is False


def test_training_budget_reads_steps_batch_and_context():
    budget = training_budget(ckpt("masked_discrete"))
    assert budget["global_step"] == 4 and budget["batch_size"] == 4 and budget["seq_len"] == 32
    assert budget["tokens"] == 4 * 4 * 32


def test_compare_cli_same_checkpoint_gives_speedup_one(tmp_path):
    a = ckpt("masked_discrete")
    result = call_main("diffuse.compare", f"a={a}", f"b={a}", f"judge={ckpt('autoregressive')}",
                       f"hydra.run.dir={tmp_path}", *QUICK)
    assert result.returncode == 0, result
    report = json.loads((tmp_path / "comparison.json").read_text())
    assert report["speedup"]["found"] and report["speedup"]["step_speedup"] == 1.0
    assert report["a"]["likelihood"]["val/bpt"] == report["b"]["likelihood"]["val/bpt"]
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "step speedup **1×**" in (tmp_path / "comparison.md").read_text()


def test_compare_cli_autoregressive_vs_diffusion_shows_matched_training_tokens(tmp_path):
    result = call_main("diffuse.compare", f"a={ckpt('autoregressive')}", f"b={ckpt('masked_discrete')}",
                       f"hydra.run.dir={tmp_path}", *QUICK)
    assert result.returncode == 0, result
    report = json.loads((tmp_path / "comparison.json").read_text())
    a_points = report["a"]["sweep"]
    assert len(a_points) == 1 and a_points[0]["sampler"] == "ar"  # AR: one point, steps = NFE
    assert a_points[0]["steps"] == a_points[0]["nfe"] <= 8
    assert [p["steps"] for p in report["b"]["sweep"]] == [2, 4]
    assert report["a"]["budget"]["tokens"] == 40 * 4 * 32 and report["b"]["budget"]["tokens"] == 4 * 4 * 32
    assert report["judge"].startswith("A (")  # no judge given: the autoregressive one
    md = (tmp_path / "comparison.md").read_text()
    assert "training tokens" in md and "5,120" in md and "512" in md
    assert any("judge is one of the compared models" in n for n in report["notes"])
