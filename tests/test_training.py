"""Training end to end (the `diffuse.train` entry point, in-process) and a tiny model overfitting."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import SPECIAL, VOCAB, call_main, tiny_args
from diffuse.registry import MODELS, OBJECTIVES
from diffuse.schedules import build_schedule

FINAL_KEYS = ("val/nelbo", "val/bpt", "train/loss", "train/tokens_per_sec")


def train(corpus, run_dir: Path, *extra: str):
    result = call_main("diffuse.train", *tiny_args(corpus, run_dir, *extra))
    assert result.returncode == 0, result
    return result


def losses_by_step(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("objective", ["masked_discrete", "autoregressive"])
def test_five_step_run_writes_checkpoint_and_metrics(objective, schedule, corpus, tmp_path):
    train(corpus, tmp_path, f"objective={objective}", f"schedule={schedule}")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 5
    assert ckpt["diffuse"]["config"]["objective"]["name"] == objective and ckpt["diffuse"]["tokenizer"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in FINAL_KEYS:
        assert metrics.get(key) is not None and math.isfinite(metrics[key]), (key, metrics)
    assert metrics["val/bpt"] == pytest.approx(metrics["val/nelbo"] / math.log(2))
    assert 0 < metrics["val/nelbo"] < 2 * math.log(260)  # a bound in nats/token, not a sum
    assert sorted(losses_by_step(tmp_path)) == [0, 1, 2, 3, 4]  # log_every_n_steps=1 in the debug preset
    assert (tmp_path / ".hydra" / "config.yaml").is_file()


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(corpus, tmp_path):
    straight, interrupted, from_mid = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # A: 6 steps in one go, keeping the step-3 checkpoint as well
    train(corpus, straight, "trainer.max_steps=6", "trainer.val_check_interval=3",
          "callbacks.last_checkpoint.save_top_k=-1")
    # B: 3 steps, then resume=true in the same run dir up to 6
    train(corpus, interrupted, "trainer.max_steps=3")
    train(corpus, interrupted, "trainer.max_steps=6", "resume=true")
    # C: ckpt_path= a checkpoint written in the middle of A
    mid = next((straight / "checkpoints").glob("*step=3.ckpt"))
    train(corpus, from_mid, "trainer.max_steps=6", "trainer.val_check_interval=3", f"ckpt_path='{mid}'")  # Lightning's names hold '=': quote

    a = losses_by_step(straight)
    assert sorted(a) == list(range(6))
    for run in (interrupted, from_mid):
        resumed = losses_by_step(run)
        assert {3, 4, 5} <= set(resumed), resumed
        for step in (3, 4, 5):
            assert resumed[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (run.name, step, resumed, a)
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 6
    final = json.loads((straight / "metrics.json").read_text())["train/loss"]
    assert json.loads((interrupted / "metrics.json").read_text())["train/loss"] == pytest.approx(final, rel=1e-5)


@pytest.mark.parametrize("objective", ["masked_discrete", "autoregressive"])
def test_tiny_model_overfits_one_batch(objective):
    """64 wide, 2 layers, one fixed batch; the masked objective sees the same t and mask each step
    (a fixed noise generator), so its loss at that t must collapse like the AR one."""
    torch.manual_seed(0)
    ids = torch.randint(0, 36, (4, 32), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = SPECIAL.bos
    batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids)}
    model = MODELS.build({"name": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 2}, vocab_size=VOCAB)
    objective = OBJECTIVES.build({"name": objective}, schedule=build_schedule("linear"), special=SPECIAL)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss():
        return objective.loss(model, batch, torch.Generator().manual_seed(0)).loss

    first = loss().item()
    for _ in range(200):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.1 * first
