"""method=dcd (Duo's discrete consistency distillation): the duality's argmax trajectory has the uniform-state
marginals, the coupled pair is nested in noise, the loss, the round plan, refusals and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from diffuse.distillation.dcd import DCD, argmax_match_probability, duality_ratio
from diffuse.errors import DiffuseError
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.objectives.uniform import Uniform
from diffuse.schedules import build_schedule
from tests.conftest import (
    SPECIAL,
    VOCAB,
    call_main,
    packed_batch,
    tiny_args,
    tiny_transformer,
)


@pytest.mark.parametrize("V", [7, 4096])
def test_duality_ratio_inverts_the_argmax_probability(V):
    alpha = torch.tensor([0.0, 0.05, 0.5, 0.95], dtype=torch.float64)
    r = duality_ratio(alpha, V)
    torch.testing.assert_close(argmax_match_probability(r, V), alpha + (1 - alpha) / V, rtol=0, atol=1e-8)
    assert float(r[0]) < 1e-6 and bool((r.diff() > 0).all())


def test_argmax_trajectory_has_the_uniform_marginal():
    """Monte Carlo: z = argmax(r·e_x + ε) keeps x with α + (1 − α)/V and is uniform over the other tokens."""
    V, x, n = 7, 3, 40_000
    g = torch.Generator().manual_seed(0)
    for a in (0.2, 0.7):
        r = duality_ratio(torch.tensor(a, dtype=torch.float64), V).float()
        z = (r * torch.nn.functional.one_hot(torch.tensor(x), V) + torch.randn(n, V, generator=g)).argmax(-1)
        freq = torch.bincount(z, minlength=V).float() / n
        expect = torch.full((V,), (1 - a) / V)
        expect[x] += a
        assert (freq - expect).abs().max() < 0.012, (a, freq)


def objective():
    return Uniform(build_schedule("linear"), SPECIAL)


def test_coupled_pair_loss_and_refusals():
    student = tiny_transformer(time_conditioning=True).train()
    dcd = DCD(objective(), tiny_transformer(seed=1, time_conditioning=True), student_steps=4)
    batch = packed_batch(4, 12, docs=True)
    obj = objective()
    t, s = torch.full((4, 1), 0.9), torch.full((4, 1), 0.3)
    z_t, z_s = dcd.coupled(obj, batch["input_ids"], t, s, batch, torch.Generator().manual_seed(0), VOCAB)
    given = ~obj.noisable(batch)
    assert torch.equal(z_t[given], batch["input_ids"][given]) and torch.equal(z_s[given], batch["input_ids"][given])
    x0 = batch["input_ids"]
    kept_t = (z_t == x0) & ~given
    # one shared ε: raising r only raises x's coordinate, so a token kept at t is kept at the earlier s
    assert kept_t.any() and (z_s[kept_t] == x0[kept_t]).all() and ((z_s == x0) & ~given).sum() > kept_t.sum()
    assert dcd.dt == 1 / 8  # the teacher's step: twice the student's 4 steps
    out = dcd.loss(obj, student, batch, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert float(out.loss) > 0 and student.tok_emb.weight.grad is not None
    assert all(p.grad is None for p in dcd.teacher.net.parameters())
    with pytest.raises(DiffuseError, match="uniform-state"):
        DCD(MaskedDiscrete(build_schedule("linear"), SPECIAL), tiny_transformer(), student_steps=4)
    with pytest.raises(DiffuseError, match="method.divergence"):
        DCD(objective(), tiny_transformer(), student_steps=4, divergence="mse")


def test_round_plan_halves_the_steps():
    cfg = OmegaConf.create({"rounds": 2, "steps": 8, "teacher": "t.ckpt"})
    plans = DCD.rounds(cfg, {"name": "dcd"}, {}, __import__("pathlib").Path("out"))
    assert [p.steps for p in plans] == [4, 2] and [p.distill["student_steps"] for p in plans] == [4, 2]
    assert plans[1].init_from.endswith("round1/checkpoints/last.ckpt")
    with pytest.raises(DiffuseError, match="2\\^rounds"):
        DCD.rounds(OmegaConf.create({"rounds": 3, "steps": 4, "teacher": "t"}), {"name": "dcd"}, {}, None)


def test_dcd_cli(corpus, tmp_path):
    run = tmp_path / "teacher"
    res = call_main("diffuse.train", *tiny_args(corpus, run, "objective=uniform", "trainer.max_steps=2",
                                                "trainer.val_check_interval=2"))
    assert res.returncode == 0, res
    out = tmp_path / "distill"
    res = call_main("diffuse.distill", f"teacher={run / 'checkpoints' / 'last.ckpt'}", "method=dcd", "rounds=1",
                    "steps=8", "max_steps=2", 'overrides=["debug=default","num_samples=0"]', f"hydra.run.dir={out}")
    assert res.returncode == 0, res
    summary = json.loads((out / "distill.json").read_text())
    assert summary[0]["steps"] == 4 and summary[0]["method"] == "dcd"
