"""EMA of the weights (`callbacks=ema`, Lightning's EMAWeightAveraging): validation, the samples printed
at the end of training, sample / evaluate / export use the averaged weights; resume restores raw weights and EMA."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import call_main, tiny_args
from diffuse.run.load import load_run
from diffuse.run.callbacks.ema import inference_state_dict

EMA = ("callbacks=ema", "callbacks.ema.decay=0.5", "optim.lr=1e-2")  # warm-up: the lr does not depend on max_steps


def train(corpus, run_dir, *extra):
    result = call_main("diffuse.train", *tiny_args(corpus, run_dir, *EMA, *extra))
    assert result.returncode == 0, result
    return result


def last(run_dir, name="last.ckpt"):
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)  # plain: loads safely


def losses_by_step(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def assert_same_weights(a: dict, b: dict, rel=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rel, atol=1e-6), k


def test_validation_final_samples_and_every_loader_use_the_averaged_weights(corpus, tmp_path):
    from diffuse.evaluation.likelihood import evaluate_likelihood
    from diffuse.evaluation.runner import heldout, load_checkpoint
    from diffuse.export import export, load_exported

    run = tmp_path / "run"
    result = train(corpus, run, "num_samples=1", "sample_length=12")
    ckpt = last(run)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert ema.keys() == raw.keys() and int(ckpt["averaging_state"]["n_averaged"]) == 5
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # decay 0.5 over 5 steps: they differ

    # load_run (sample, evaluate, export, frozen teachers) loads the EMA
    cfg, tokenizer, module = load_run(str(run / "checkpoints" / "last.ckpt"))
    assert_same_weights(module.state_dict(), ema, rel=0)
    assert inference_state_dict(ckpt, ema=False) is raw

    # validation (so metrics.json and best.ckpt) measured the EMA: the held-out NELBO of the EMA weights, not the raw
    c = load_checkpoint(str(run / "checkpoints" / "last.ckpt"), "cpu")
    batches = list(heldout(c, dict(c.cfg.data), int(c.cfg.seed), str(tmp_path / "cache")).val_dataloader())[:2]
    trained = json.loads((run / "metrics.json").read_text())["val/nelbo"]
    assert evaluate_likelihood(c.module, batches, t_samples=1, seed=int(c.cfg.seed))["val/nelbo"] == pytest.approx(trained, rel=1e-5)
    c.module.load_state_dict(raw)
    with_raw = evaluate_likelihood(c.module, batches, t_samples=1, seed=int(c.cfg.seed))["val/nelbo"]
    assert with_raw != pytest.approx(trained, rel=1e-5)
    assert last(run, "best.ckpt")["state_dict"].keys() == ema.keys()

    # the sample printed at the end of training came from the EMA weights
    out = module.generate([[]], 12, seed=int(cfg.seed))
    text = tokenizer.decode(out.tokens[0, : int(out.lengths[0])].tolist(), skip_special_tokens=True)
    assert f"---\n{text}\n" in result.stdout, (text, result.stdout[-500:])

    # export writes the EMA backbone
    _, _, exported = load_exported(str(export(str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))))
    for k, v in exported.backbone.state_dict().items():
        assert torch.equal(v, ema[f"backbone.{k}"]), k


def test_resume_restores_raw_weights_and_ema_like_an_uninterrupted_run(corpus, tmp_path):
    straight, interrupted, from_mid = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(corpus, straight, "trainer.max_steps=6", "trainer.val_check_interval=3", "callbacks.last_checkpoint.save_top_k=-1")
    train(corpus, interrupted, "trainer.max_steps=3")  # its last.ckpt is written after fit (module holds the EMA)
    train(corpus, interrupted, "trainer.max_steps=6", "resume=true")
    mid = next((straight / "checkpoints").glob("*step=3.ckpt"))  # written during fit
    train(corpus, from_mid, "trainer.max_steps=6", "trainer.val_check_interval=3", f"ckpt_path='{mid}'")

    a, final = losses_by_step(straight), last(straight)
    for run in (interrupted, from_mid):
        resumed = losses_by_step(run)
        for step in (3, 4, 5):  # the raw weights were restored
            assert resumed[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (run.name, step)
        ckpt = last(run)
        assert ckpt["global_step"] == 6 and int(ckpt["averaging_state"]["n_averaged"]) == 6
        assert_same_weights(ckpt["current_model_state"], final["current_model_state"])
        assert_same_weights(ckpt["state_dict"], final["state_dict"])  # and the EMA
        nelbo = json.loads((run / "metrics.json").read_text())["val/nelbo"]
        assert nelbo == pytest.approx(json.loads((straight / "metrics.json").read_text())["val/nelbo"], rel=1e-5)

    # EMA turned off on resume: training continues from the raw weights, not the average
    off = tmp_path / "d"
    train(corpus, off, "trainer.max_steps=3")
    result = call_main("diffuse.train", *tiny_args(corpus, off, "optim.lr=1e-2", "trainer.max_steps=4", "resume=true"))
    assert result.returncode == 0, result
    assert losses_by_step(off)[3] == pytest.approx(a[3], rel=1e-5, abs=1e-6)
    assert "current_model_state" not in last(off)


def test_before_the_first_update_validation_and_checkpoints_use_the_raw_weights(corpus, tmp_path):
    plain, late = tmp_path / "plain", tmp_path / "late"
    call_main("diffuse.train", *tiny_args(corpus, plain, "optim.lr=1e-2", "trainer.max_steps=3"))
    train(corpus, late, "trainer.max_steps=3", "callbacks.ema.update_starting_at_step=100")
    ckpt = last(late)
    assert "current_model_state" not in ckpt and ckpt["callbacks"]["EMA"]["latest_update_step"] == 0
    assert_same_weights(ckpt["state_dict"], last(plain)["state_dict"], rel=0)
    metrics = [json.loads((run / "metrics.json").read_text())["val/nelbo"] for run in (plain, late)]
    assert math.isfinite(metrics[0]) and metrics[0] == metrics[1]


def test_inference_weights_of_lightning_layout_checkpoints():
    ema, raw = {"w": torch.ones(1)}, {"w": torch.zeros(1)}
    assert inference_state_dict({"state_dict": raw}) is raw  # no EMA
    both = {"state_dict": ema, "current_model_state": raw, "averaging_state": {"n_averaged": torch.tensor(3)}}
    assert inference_state_dict(both) is ema and inference_state_dict(both, ema=False) is raw
    # Lightning's own callback before its first update: state_dict holds the initial weights
    never = {**both, "averaging_state": {"n_averaged": torch.tensor(0)}}
    assert inference_state_dict(never) is raw
