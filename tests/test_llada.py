"""objective=llada: the importance-weighted loss, what may be masked, the hooks, and recipe=llada end to end."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import call_main, write_corpus
from diffuse.objectives.base import SpecialTokens
from diffuse.objectives.llada import LLaDA
from diffuse.schedules import build_schedule

SPECIAL = SpecialTokens(pad=0, bos=1, eos=2, mask=3)
VOCAB = 24  # includes [MASK]; the SUBS prediction is uniform over the other 23
PLUGIN_METRICS = ("accuracy", "mask_ratio", "num_masked_tokens", "avg_p_mask", "ce_loss", "importance_weight_avg")


class ContextFree(nn.Module):
    """Logits from a fixed table, ignoring context: CE at a position depends only on its target."""

    time_conditioned = False

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False):
        return torch.zeros(*ids.shape, 1)

    def logits(self, hidden):
        return hidden + self.table


def batch_of(B=8, L=16, seed=0, prompt=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (B, L), generator=g)
    ids[:, 0], ids[:, L - 3] = SPECIAL.bos, SPECIAL.eos
    ids[:, L - 2:] = SPECIAL.pad
    seg = torch.ones_like(ids)
    seg[:, L - 2:] = 0
    out = {"input_ids": ids, "segment_ids": seg}
    if prompt:
        out["prompt_mask"] = (torch.arange(L) < 1 + prompt).long().expand(B, L).clone()
    return out


@pytest.mark.parametrize("schedule,clamp", [("linear", (0.0, 1.0)), ("cosine", (0.0, 1.0)), ("cosine", (0.2, 0.8))])
def test_uniform_predictor_costs_ln_v(schedule, clamp):
    """E[Σ_masked CE/p] ÷ #maskable = ln V for every schedule and clamp; val/nelbo = (1 − ε)·ln V.
    (Fixed seeds; the 1/p weights are heavy-tailed, so the tolerance is a few percent — far below what
    dividing by the padded length, 16/12, or by all real tokens, 14/12, would cost.)"""
    obj = LLaDA(SPECIAL, build_schedule(schedule), min_mask_ratio=clamp[0], max_mask_ratio=clamp[1])
    uniform = ContextFree(torch.zeros(VOCAB))
    batch = batch_of(B=64)
    losses, nll, tokens = [], 0.0, 0
    with torch.no_grad():
        for k in range(120):
            losses.append(float(obj.loss(uniform, batch, torch.Generator().manual_seed(k), train=True).loss))
            val = obj.loss(uniform, batch, torch.Generator().manual_seed(10_000 + k), train=False)
            nll, tokens = nll + float(val.nll_sum), tokens + int(val.n_tokens)
    ln_v = math.log(VOCAB - 1)
    assert sum(losses) / len(losses) == pytest.approx(ln_v, rel=0.04)
    assert nll / tokens == pytest.approx((1 - obj.eps) * ln_v, rel=0.02)


def recording_corrupt(obj) -> dict:
    """Make `obj.corrupt` remember its last output, so a test sees which tokens the loss masked."""
    seen, corrupt = {}, obj.corrupt

    def wrapped(*args):
        seen["z"] = corrupt(*args)
        return seen["z"]

    obj.corrupt = wrapped
    return seen


def test_importance_weighting_off_is_mean_masked_ce():
    table = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    model, batch = ContextFree(table), batch_of()
    obj = LLaDA(SPECIAL, build_schedule("linear"), importance_weighting=False)
    seen = recording_corrupt(obj)
    out = obj.loss(model, batch, torch.Generator().manual_seed(3))
    table[SPECIAL.mask] = -float("inf")
    ce = -table.log_softmax(-1)[batch["input_ids"][seen["z"] == SPECIAL.mask]]
    assert float(out.loss) == pytest.approx(float(ce.mean()), rel=1e-5)
    assert "importance_weight_avg" not in out.metrics


@pytest.mark.parametrize("mask_eos", [False, True])
def test_specials_and_prompt_are_never_masked(mask_eos):
    obj = LLaDA(SPECIAL, build_schedule("linear"), mask_eos=mask_eos)
    batch = batch_of(prompt=4)
    x0 = batch["input_ids"]
    z = obj.corrupt(x0, torch.ones(x0.shape[0], 1), torch.zeros(x0.shape, dtype=torch.float), batch)  # p = 1
    masked = z == SPECIAL.mask
    protected = torch.isin(x0, torch.tensor([SPECIAL.bos, SPECIAL.pad])) | batch["prompt_mask"].bool()
    assert not masked[protected].any()
    assert masked[x0 == SPECIAL.eos].all() == mask_eos and masked[x0 == SPECIAL.eos].any() == mask_eos
    answer = ~protected & (x0 != SPECIAL.eos)
    assert masked[answer].all()  # everything else is maskable
    assert obj.maskable(batch).sum() == answer.sum() + mask_eos * (x0 == SPECIAL.eos).sum()


def test_mask_probability_schedule_and_clamp():
    lin = LLaDA(SPECIAL, build_schedule("linear"))
    t = torch.tensor([[0.0], [0.5], [1.0]])
    assert torch.allclose(lin.mask_prob(t), (1 - 1e-3) * t + 1e-3)
    cos = LLaDA(SPECIAL, build_schedule("cosine"))  # the schedule group sets α(t)
    assert torch.allclose(cos.mask_prob(t), 1e-3 + (1 - 1e-3) * (1 - torch.cos(math.pi * t / 2)))
    clamped = LLaDA(SPECIAL, build_schedule("cosine"), min_mask_ratio=0.3, max_mask_ratio=0.6)
    p = clamped.mask_prob(clamped.sample_t(torch.zeros(512, 4, dtype=torch.long), torch.Generator().manual_seed(0)))
    assert p.min() == pytest.approx(0.3, abs=1e-6) and p.max() == pytest.approx(0.6, abs=1e-6)
    p_val = clamped.mask_prob(clamped.sample_t(torch.zeros(512, 4, dtype=torch.long), train=False))
    assert p_val.min() < 0.05 and p_val.max() > 0.95  # validation is not clamped: the bound stays a bound


def test_coupled_corruptions_are_nested_and_hooks_match():
    obj = LLaDA(SPECIAL, build_schedule("linear"))
    batch = batch_of()
    x0 = batch["input_ids"]
    noise = obj.draw_noise(x0, torch.Generator().manual_seed(0))
    early = obj.corrupt(x0, torch.full((x0.shape[0], 1), 0.7), noise, batch)
    late = obj.corrupt(x0, torch.full((x0.shape[0], 1), 0.3), noise, batch)
    assert (obj.still_noisy(early) | ~obj.still_noisy(late)).all()  # masked late ⇒ masked early
    assert obj.noise_level(torch.tensor([[0.3]])).item() == pytest.approx(0.3 * (1 - 1e-3) + 1e-3)
    logp = obj.predict(ContextFree(torch.zeros(VOCAB)), early, torch.full((x0.shape[0], 1), 0.7), batch)
    assert torch.isinf(logp[..., SPECIAL.mask]).all()
    kept = ~obj.still_noisy(early)
    assert (logp[kept].argmax(-1) == early[kept]).all()
    assert obj.distance(logp, logp, kept.float()).abs().max() == 0
    assert obj.causal is False and obj.default_sampler == "llada"


def test_metrics_have_the_plugin_names():
    obj = LLaDA(SPECIAL, build_schedule("linear"))
    out = obj.loss(ContextFree(torch.zeros(VOCAB)), batch_of(), torch.Generator().manual_seed(0))
    assert set(PLUGIN_METRICS) - {"accuracy"} <= set(out.metrics)  # accuracy comes from token_correct
    assert out.token_correct is not None and out.token_correct.numel() == int(out.metrics["num_masked_tokens"])
    assert 0 < float(out.metrics["avg_p_mask"]) <= 1 and float(out.metrics["importance_weight_avg"]) >= 1


def test_mask_token_id_override():
    obj = LLaDA(SPECIAL, build_schedule("linear"), mask_token_id=7)
    assert obj.special.mask == 7 and obj.special.bos == SPECIAL.bos


def read_metric_names(run_dir: Path) -> set[str]:
    with (run_dir / "metrics.csv").open() as f:
        return set(next(csv.reader(f)))


def run_train(run_dir: Path, *overrides: str) -> Path:
    """A 4-step debug run of the real entry point (in-process: Hydra, Lightning, loggers, callbacks)."""
    result = call_main("diffuse.train", "debug=default", "tokenizer=byte", "num_samples=0", "trainer.max_steps=4",
                       "trainer.val_check_interval=4", f"hydra.run.dir={run_dir}", *overrides)
    assert result.returncode == 0, result
    return run_dir


def test_recipe_llada_trains_offline_and_logs_plugin_metrics(tmp_path):
    text = write_corpus(tmp_path / "tiny.txt", paragraphs=40)
    run_dir = run_train(tmp_path / "run", "recipe=llada", "data=text", f"data.path={text}")
    names = read_metric_names(run_dir)
    assert {f"train/{m}" for m in PLUGIN_METRICS} | {"train/loss", "val/nelbo", "val/bpt"} <= names
    with (run_dir / "samples.csv").open() as f:  # the sample_every_n_steps callback ran
        rows = list(csv.DictReader(f))
    assert rows and int(rows[0]["n_masked"]) > 0 and int(rows[0]["nfe"]) > 0
    assert all(r["masked"].count("[MASK]") == int(r["n_masked"]) for r in rows)
