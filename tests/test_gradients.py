"""Gradient analysis (callbacks=analysis): t inside each corruption bucket, gradient norms without touching the
optimizer, a training run identical with and without it, and the heatmap drawn from its metrics.csv."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import SPECIAL, VOCAB, error_lines, tiny_transformer
from diffuse.run.callbacks.gradients import bucket_gradient_norms, bucket_t_ranges, supports, t_for_level
from diffuse.core.metrics import BUCKETS
from diffuse.registry import OBJECTIVES
from diffuse.report import main as report_main
from diffuse.schedules import build_schedule
from evaluation_runs import BASE, train, tiny_run



def objective(name="masked_discrete", schedule="linear", **kw):
    return OBJECTIVES.build({"name": name, **kw}, schedule=build_schedule(schedule), special=SPECIAL)


@pytest.mark.parametrize("name,schedule", [("masked_discrete", "linear"), ("masked_discrete", "cosine"),
                                           ("llada", "linear"), ("llada", "cosine")])
def test_t_for_level_inverts_the_objectives_noise_level(name, schedule):
    obj = objective(name, schedule)
    for level in (0.05, 0.3, 0.7, 0.95):
        t = t_for_level(obj, level)
        assert float(obj.noise_level(torch.tensor(t, dtype=torch.float64))) == pytest.approx(level, abs=1e-6)
    assert t_for_level(objective("masked_discrete", "linear"), 0.3) == pytest.approx(0.3, abs=1e-9)  # 1 − α = t


def batch(B=8, L=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 36, (B, L), generator=g)
    ids[:, 0] = SPECIAL.bos
    return {"input_ids": ids, "segment_ids": torch.ones_like(ids)}


def test_each_bucket_masks_inside_its_range_and_leaves_optimizer_grads_alone():
    obj = objective()
    ranges = bucket_t_ranges(obj)
    assert list(ranges) == [name for name, _, _ in BUCKETS] and ranges["low"][0] == pytest.approx(obj.eps)
    model = tiny_transformer(VOCAB).train()
    b = batch()
    # the probe's loss sees a mask ratio inside each bucket (up to sampling noise of 8 × 47 tokens)
    for name, lo, hi in BUCKETS:
        t_lo, t_hi = ranges[name]
        mid = 0.5 * (t_lo + t_hi)  # t = mid for every row, through the supported t_range argument
        ratio = float(obj.loss(model, b, torch.Generator().manual_seed(1), t_range=(mid, mid)).metrics["mask_ratio"])
        assert lo - 0.1 < ratio < min(hi, 1.0) + 0.1, (name, ratio)
    values = bucket_gradient_norms(obj, model, b, torch.Generator().manual_seed(0), ranges)
    assert set(values) == {f"grad/{k}_{n}" for k in ("norm", "loss") for n in ("low", "mid", "high")}
    assert all(v > 0 and v == v for v in values.values())
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: nothing accumulated
    assert obj.sample_t.__func__ is type(obj).sample_t  # the objective itself is unchanged


def test_objectives_without_a_noise_level_are_skipped():
    assert not supports(objective("autoregressive"))
    assert supports(objective("masked_discrete")) and supports(objective("llada"))


def read_rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_analysis_run_logs_bucket_norms_trains_identically_and_draws_a_heatmap(tmp_path):
    plain = tiny_run("masked_discrete")
    run = train("masked_discrete", BASE / "analysis", "callbacks=analysis", "callbacks.gradient_analysis.every_n_steps=2")
    rows = [r for r in read_rows(run) if r.get("grad/norm_low")]
    assert [int(r["step"]) for r in rows] == [0, 2]
    assert all(float(r[f"grad/norm_{b}"]) > 0 for r in rows for b in ("low", "mid", "high"))
    # forked RNG, no .grad touched: the same training as without the analysis
    same = json.loads((plain / "metrics.json").read_text())["val/nelbo"]
    assert json.loads((run / "metrics.json").read_text())["val/nelbo"] == pytest.approx(same, rel=1e-6)

    report_main(["--heatmap", str(run), "--out", str(tmp_path / "h")])
    assert (tmp_path / "h" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    report_main(["--heatmap", str(run)])
    assert (run / "heatmap.png").is_file()
    report_main(["--heatmap", str(run), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_heatmap_of_a_run_without_the_analysis_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        report_main(["--heatmap", str(tiny_run("masked_discrete"))])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "callbacks=analysis" in err
