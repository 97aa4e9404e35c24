"""Fast-dLLM's approximate caches on the absorbing decode loop (sampler.cache = prefix | dual;
diffuse/sampling/canvas_cache.py): a block's first pass is the no-cache pass, a one-layer model is exact
under both caches, batch = singles with prompts of different lengths, the positions each cache feeds,
the one-line refusals, and a trained model whose cached tokens mostly agree with the uncached ones."""

from __future__ import annotations

import pytest
import torch

from conftest import SPECIAL, VOCAB, ZeroBackbone, tiny_transformer
from diffuse.errors import DiffuseError
from diffuse.objectives.llada import LLaDA
from diffuse.registry import SAMPLERS
from diffuse.sampling import canvas_cache
from diffuse.sampling.llada import LLaDASampler, ThresholdSampler
from diffuse.schedules import build_schedule

OBJECTIVE = LLaDA(SPECIAL, build_schedule("linear"))
PROMPTS = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9], [10]]  # left-padded to BOS + 6: the span starts at column 7
TOL = {"atol": 1e-5, "rtol": 1e-5}


def record_passes(monkeypatch) -> list[tuple]:
    """Every canvas pass of the decode loop: (span x, t, block, first, log-probs)."""
    seen, original = [], canvas_cache.Canvas.predict

    def spy(self, x, t, block, first):
        logp, passes = original(self, x, t, block, first)
        seen.append((x.clone(), t.clone(), block, first, logp.clone()))
        return logp, passes

    monkeypatch.setattr(canvas_cache.Canvas, "predict", spy)
    return seen


def exact(model, x, t, cfg_scale=0.0, prompts=PROMPTS):
    """The no-cache log-probs of span x: one pass over the whole right-padded canvas."""
    return canvas_cache.Canvas(model, OBJECTIVE, prompts, x.shape[1], cfg_scale).predict(x, t, None, True)[0]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_first_pass_of_each_block_is_the_no_cache_pass_and_one_layer_is_exact(monkeypatch, cache, cfg_scale):
    """The first pass of every block runs the whole canvas: its log-probs are the no-cache ones. The other
    passes are approximate from the second layer on (the cached K/V saw older masks); a one-layer model's
    K/V depend only on each position's own token, and only the block changes inside a block: exact."""
    sampler = LLaDASampler(steps=12, span_length=4, cache=cache, cfg_scale=cfg_scale)
    for layers in (2, 1):
        seen = record_passes(monkeypatch)
        model = tiny_transformer(n_layers=layers)
        sampler.generate(model, OBJECTIVE, PROMPTS, 12, seed=0)
        monkeypatch.undo()
        assert [s[3] for s in seen] == [True, False, False, False] * 3  # 3 blocks of 4 passes
        worst = 0.0
        for x, t, (lo, hi), first, logp in seen:
            ref = exact(model, x, t, cfg_scale)
            if first or layers == 1:
                torch.testing.assert_close(logp[:, lo:hi], ref[:, lo:hi], **TOL)
            if first:
                torch.testing.assert_close(logp, ref, **TOL)  # the whole span
            else:
                worst = max(worst, float((logp[:, lo:hi] - ref[:, lo:hi]).nan_to_num(0.0).abs().max()))
        if layers == 2:
            assert worst > 1e-4, "two layers: the cached passes should differ from the exact ones"


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_exact_cases_give_the_uncached_tokens(cache):
    """A one-layer model (any steps), or one step per block (every pass a full one): the same tokens."""
    one_layer = tiny_transformer(n_layers=1)
    for sampler in (LLaDASampler(steps=16, span_length=4, remasking="random"),
                    ThresholdSampler(threshold=0.06, steps=16, span_length=4)):
        ref = sampler.generate(one_layer, OBJECTIVE, PROMPTS, 16, seed=1)
        sampler.cache = cache
        out = sampler.generate(one_layer, OBJECTIVE, PROMPTS, 16, seed=1)
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.row_nfe, ref.row_nfe)
    two_layers = tiny_transformer(n_layers=2)
    ref = LLaDASampler(steps=4, span_length=4).generate(two_layers, OBJECTIVE, PROMPTS, 16, seed=2)
    out = LLaDASampler(steps=4, span_length=4, cache=cache).generate(two_layers, OBJECTIVE, PROMPTS, 16, seed=2)
    assert torch.equal(out.tokens, ref.tokens) and out.nfe == ref.nfe == 4 and out.positions == ref.positions


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_batch_equals_singles_with_prompts_of_different_lengths(cache):
    model = tiny_transformer(n_layers=2)
    for sampler in (LLaDASampler(steps=8, span_length=4, cache=cache),
                    ThresholdSampler(threshold=0.06, steps=12, span_length=4, cache=cache)):
        batch = sampler.generate(model, OBJECTIVE, PROMPTS, 12, seed=5)
        for i, p in enumerate(PROMPTS):
            alone = sampler.generate(model, OBJECTIVE, [p], 12, seed=5 + i)
            assert torch.equal(batch.tokens[i], alone.tokens[0]), (i, batch.tokens[i], alone.tokens[0])
            assert int(batch.row_nfe[i]) == alone.nfe


def test_positions_fed_per_cache():
    """Canvas W = BOS + 6 + 16 = 23; 4 blocks of 4 tokens at columns c = 7, 11, 15, 19, 4 passes each:
    none 16·23, prefix Σ 23 + 3·(23 − c), dual 4·(23 + 3·4); guidance doubles each; NFE stays 16."""
    model = tiny_transformer()
    expect = {None: 16 * 23, "prefix": sum(23 + 3 * (23 - c) for c in (7, 11, 15, 19)), "dual": 4 * (23 + 3 * 4)}
    for cache, positions in expect.items():
        out = LLaDASampler(steps=16, span_length=4, cache=cache).generate(model, OBJECTIVE, PROMPTS, 16)
        assert (out.nfe, out.positions) == (16, positions)
        assert out.row_nfe.tolist() == [16] * 4
        guided = LLaDASampler(steps=16, span_length=4, cache=cache, cfg_scale=1.0).generate(
            model, OBJECTIVE, PROMPTS, 16)
        assert (guided.nfe, guided.positions) == (32, 2 * positions)
    assert expect["dual"] < expect["prefix"] < expect[None]


def test_one_block_caches_the_prompt_and_dual_equals_prefix():
    """span_length null: the span is one block; prefix feeds the span after the first pass, and dual
    (an empty suffix) is the same thing."""
    model = tiny_transformer()
    outs = {c: ThresholdSampler(threshold=0.06, steps=8, cache=c).generate(model, OBJECTIVE, PROMPTS, 8, seed=3)
            for c in ("prefix", "dual")}
    assert torch.equal(outs["prefix"].tokens, outs["dual"].tokens)
    assert outs["prefix"].positions == outs["dual"].positions == 15 + (outs["dual"].nfe - 1) * 8


def test_refusals_are_one_line():
    with pytest.raises(DiffuseError, match=r"sampler.cache='full' must be null \(no cache\), prefix or dual"):
        SAMPLERS.build({"name": "llada", "cache": "full"})
    from diffuse.models.mamba2 import Mamba2

    mamba = Mamba2(vocab_size=VOCAB, d_model=32, n_layers=1, d_state=8, headdim=8, chunk_size=4).eval()
    for model, what in ((mamba, "model=mamba2 keeps a recurrent state"),
                        (ZeroBackbone(), "model=ZeroBackbone has no KV cache")):
        with pytest.raises(DiffuseError) as err:
            LLaDASampler(steps=4, span_length=4, cache="dual").generate(model, OBJECTIVE, PROMPTS, 8)
        msg = str(err.value)
        assert what in msg and "use sampler.cache=null" in msg and "\n" not in msg, msg


# -- a trained model: cached tokens agree mostly, not necessarily exactly ----------------------------
CYCLE = [5, 17, 2, 30, 11]  # rows repeat this cycle from a random phase


def cycle_rows(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    phase = torch.randint(0, len(CYCLE), (n, 1), generator=g)
    return torch.tensor(CYCLE)[(phase + torch.arange(length)) % len(CYCLE)]


@pytest.fixture(scope="module")
def cycle_model():
    """tiny_transformer, 400 LLaDA steps on the cycle (~6 s on one thread): the loss falls to ≈ 0.15. (200 steps
    at lr 6e-3 left some initialisations at 0.7 of the cycle: which ones depended on the CPU's arithmetic.)"""
    model = tiny_transformer(n_layers=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        ids = torch.cat([torch.full((32, 1), SPECIAL.bos), cycle_rows(32, 23, g)], 1)
        loss = OBJECTIVE.loss(model, {"input_ids": ids, "segment_ids": torch.ones_like(ids)}, g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_trained_model_cached_tokens_mostly_agree(cycle_model):
    data = cycle_rows(8, 20, torch.Generator().manual_seed(1))
    prompts = [data[i, : 1 + i % 4].tolist() for i in range(8)]
    truth = torch.stack([data[i, 1 + i % 4 : 1 + i % 4 + 16] for i in range(8)])
    for temperature in (0.0, 1.0):
        outs = {c: LLaDASampler(steps=16, span_length=4, temperature=temperature, cache=c).generate(
            cycle_model, OBJECTIVE, prompts, 16, seed=0) for c in (None, "prefix", "dual")}
        assert (outs[None].tokens == truth).float().mean() > 0.9  # the model learnt the cycle
        for c in ("prefix", "dual"):
            assert (outs[c].tokens == outs[None].tokens).float().mean() > 0.8, c
        assert outs["dual"].positions < outs["prefix"].positions < outs[None].positions
