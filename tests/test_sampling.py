"""Samplers: masks filled and commitments kept, batch = singles, EOS, the KV cache, the sample CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import SPECIAL, VOCAB, FixedLogits, call_main, run_cli, tiny_transformer
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.sampling.ar import ARSampler
from diffuse.sampling.base import trim_at_eos, truncate
from diffuse.sampling.masked import AncestralSampler, RemaskSampler
from diffuse.schedules import build_schedule

MASKED_OBJ = MaskedDiscrete(schedule=build_schedule("linear"), special=SPECIAL)
AR_OBJ = Autoregressive(special=SPECIAL)
PROMPTS = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9]]
MASKED_SAMPLERS = {
    "ancestral-linear": lambda: AncestralSampler(steps=8, schedule="linear"),
    "ancestral-cosine": lambda: AncestralSampler(steps=8, schedule="cosine"),
    "remask-cosine": lambda: RemaskSampler(steps=8, schedule="cosine"),
    "remask-random": lambda: RemaskSampler(steps=8, schedule="linear", remasking="random"),
    "remask-threshold": lambda: RemaskSampler(steps=8, confidence_threshold=0.05),
}


class Recorder(nn.Module):
    """Wraps a backbone: records every input canvas, optionally forbids some tokens. Has no
    `new_cache`, so the AR sampler re-runs the prefix through it."""

    def __init__(self, inner, forbid=()):
        super().__init__()
        self.inner, self.forbid, self.seen = inner, list(forbid), []

    @property
    def time_conditioned(self):
        return self.inner.time_conditioned

    def forward(self, ids=None, **kw):
        self.seen.append(ids.clone())
        return self.inner(ids=ids, **kw)

    def logits(self, hidden):
        out = self.inner.logits(hidden)
        out[..., self.forbid] = float("-inf")
        return out


@pytest.mark.parametrize("name", MASKED_SAMPLERS)
def test_masked_samplers_fill_every_mask_and_never_change_a_committed_token(name):
    rec = Recorder(tiny_transformer(), forbid=[SPECIAL.eos])  # no EOS: nothing is trimmed
    out = MASKED_SAMPLERS[name]().generate(rec, MASKED_OBJ, PROMPTS, 12, seed=0)
    assert out.tokens.shape == (3, 12) and out.lengths.tolist() == [12, 12, 12]
    assert not (out.tokens == SPECIAL.mask).any()
    assert out.nfe == len(rec.seen) and 1 <= out.nfe <= 8
    for r, p in enumerate(PROMPTS):
        head = [SPECIAL.bos, *p]
        final = torch.cat([torch.tensor(head), out.tokens[r]])
        states = [z[r, : len(final)] for z in rec.seen] + [final]
        for z in states:
            assert z[: len(head)].tolist() == head  # the prompt is never touched
        for earlier, later in zip(states, states[1:]):
            committed = earlier != SPECIAL.mask
            assert torch.equal(later[committed], earlier[committed])
            assert committed.sum() <= (later != SPECIAL.mask).sum()
        assert all(z[len(final):].eq(SPECIAL.pad).all() for z in (s[r] for s in rec.seen))  # padding stays


def test_remask_linear_reveals_one_token_per_step_when_steps_equal_length():
    """Linear: step j of N reveals 1/(N−j) of what is left, i.e. one token per step here."""
    rec = Recorder(tiny_transformer(), forbid=[SPECIAL.eos])
    out = RemaskSampler(steps=10, schedule="linear").generate(rec, MASKED_OBJ, [[1, 2]], 10, seed=0)
    assert [int((z == SPECIAL.mask).sum()) for z in rec.seen] == list(range(10, 0, -1))
    assert out.nfe == 10


SAMPLERS = {
    **{k: (v, MASKED_OBJ) for k, v in MASKED_SAMPLERS.items()},
    "ar": (lambda: ARSampler(temperature=1.0), AR_OBJ),
    "ar-top-k-top-p": (lambda: ARSampler(temperature=0.8, top_k=10, top_p=0.9), AR_OBJ),
    "ancestral-top-p": (lambda: AncestralSampler(steps=5, top_p=0.9), MASKED_OBJ),
}


def test_truncate_keeps_the_top_k_and_the_smallest_nucleus():
    logp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(2, 4)
    kept = lambda out: (out > float("-inf")).tolist()[0]
    assert kept(truncate(logp, top_k=2)) == [True, True, False, False]
    assert kept(truncate(logp, top_p=0.45)) == [True, False, False, False]  # 0.5 alone reaches 0.45
    assert kept(truncate(logp, top_p=0.81)) == [True, True, True, False]  # 0.8 falls short: the third joins
    assert torch.equal(truncate(logp), logp) and torch.equal(truncate(logp, top_p=1.0), logp)


def test_absorbing_proposals_come_from_the_truncated_distribution():
    """With top_k=1 one token survives, so the temperature no longer matters; untruncated, it does."""
    model = tiny_transformer(seed=1)

    def draw(temperature, **kw):
        return AncestralSampler(steps=10, temperature=temperature, **kw).generate(model, MASKED_OBJ, PROMPTS, 10, 0)

    assert torch.equal(draw(0.1, top_k=1).tokens, draw(10.0, top_k=1).tokens)
    assert not torch.equal(draw(0.1).tokens, draw(10.0).tokens)


@pytest.mark.parametrize("name", SAMPLERS)
def test_batch_equals_singles_with_prompts_of_different_lengths(name):
    """Row i of a batch drawn with seed s is the single sample drawn with seed s + i."""
    make, objective = SAMPLERS[name]
    model = tiny_transformer(seed=1).double()  # float64: padding changes nothing but rounding
    batch = make().generate(model, objective, PROMPTS, 10, seed=3)
    for i, p in enumerate(PROMPTS):
        single = make().generate(model, objective, [p], 10, seed=3 + i)
        assert torch.equal(batch.tokens[i], single.tokens[0]), (i, batch.tokens[i], single.tokens[0])
        assert batch.lengths[i] == single.lengths[0]
        assert batch.nfe_per_row()[i] == single.nfe  # a row's cost is what it costs alone
    again = make().generate(model, objective, PROMPTS, 10, seed=3)
    assert torch.equal(again.tokens, batch.tokens)
    other = make().generate(model, objective, PROMPTS, 10, seed=4)
    assert not torch.equal(other.tokens, batch.tokens)  # the seed matters (the test can fail)


def test_ar_kv_cache_gives_the_same_tokens_as_rerunning_the_prefix():
    model = tiny_transformer(seed=2)
    sampler = ARSampler(temperature=0.0)
    cached = sampler.generate(model, AR_OBJ, PROMPTS, 12, seed=0)
    rec = Recorder(model)
    plain = sampler.generate(rec, AR_OBJ, PROMPTS, 12, seed=0)
    assert torch.equal(cached.tokens, plain.tokens) and torch.equal(cached.lengths, plain.lengths)
    assert rec.seen[-1].shape[1] > rec.seen[0].shape[1]  # the uncached path re-ran a growing prefix


def test_trim_at_eos():
    e, p = SPECIAL.eos, SPECIAL.pad
    tokens = torch.tensor([[1, 2, e, 3, e], [e, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    trimmed, lengths = trim_at_eos(tokens, SPECIAL)
    assert lengths.tolist() == [2, 0, 5]
    assert trimmed.tolist() == [[1, 2, p, p, p], [p] * 5, [1, 2, 3, 4, 5]]


class CountingStub(nn.Module):
    """AR stub: predicts token 7 until a row holds 4 real tokens (BOS + prompt + generated), then EOS."""

    time_conditioned = False

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, ids=None, segment_ids=None, causal=True, **kw):
        return segment_ids.cumsum(1)[..., None].float()

    def logits(self, hidden):
        out = torch.zeros(*hidden.shape[:-1], VOCAB)
        out[..., 7] = 10.0 * (hidden[..., 0] < 4)
        out[..., SPECIAL.eos] = 10.0 * (hidden[..., 0] >= 4)
        return out


def test_ar_sampler_stops_at_eos_and_reports_lengths():
    out = ARSampler(temperature=0.0).generate(CountingStub(), AR_OBJ, [[], [1, 2]], 10, seed=0)
    assert out.lengths.tolist() == [3, 1]
    assert out.tokens[0].tolist() == [7, 7, 7] + [SPECIAL.pad] * 7
    assert out.tokens[1].tolist() == [7] + [SPECIAL.pad] * 9
    assert out.nfe == 4  # stops once every row has ended, not after `length` steps


def test_masked_sampler_trims_after_eos():
    length = 8
    logits = torch.zeros(2, 1 + length, VOCAB)
    logits[..., 5] = 10.0
    logits[0, 4, SPECIAL.eos] = 20.0  # row 0: EOS at generated position 3
    out = RemaskSampler(steps=4, temperature=0.0).generate(FixedLogits(logits), MASKED_OBJ, [[], []], length, seed=0)
    assert out.lengths.tolist() == [3, length]
    assert out.tokens[0].tolist() == [5, 5, 5] + [SPECIAL.pad] * 5
    assert out.tokens[1].tolist() == [5] * length


# -- the sample CLI on a real (tiny) checkpoint ---------------------------------------------------
def test_sample_cli_returns_decodable_text_of_the_asked_length(debug_run, tmp_path):
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    proc = run_cli("diffuse.sample", f"ckpt={ckpt}", "num_samples=2", "length=16", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["length"] == 16 and isinstance(r["text"], str) and r["text"].strip()
        assert 1 <= r["nfe_alone"] <= r["nfe"]
        assert r["text"] in proc.stdout


def test_sample_cli_options_and_batch_size_does_not_change_samples(debug_run, tmp_path):
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    texts = {}
    for batch_size in (1, 3):
        run_dir = tmp_path / f"b{batch_size}"
        result = call_main("diffuse.sample", f"ckpt={ckpt}", "num_samples=3", "length=8", "sampler=ancestral",
                           "steps=4", "prompt=The", "seed=5", f"batch_size={batch_size}", f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result
        records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert [r["sampler"] for r in records] == ["ancestral"] * 3
        assert all(r["prompt"] == "The" and r["length"] <= 8 and r["nfe"] <= 4 for r in records)
        texts[batch_size] = [r["text"] for r in records]
    assert texts[1] == texts[3]
