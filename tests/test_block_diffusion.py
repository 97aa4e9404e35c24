"""Block diffusion (BD3LM): the [x_t ; x_0] layout and its mask, the NELBO identities (uniform predictor,
block = the whole row, block = 1 token), FlexAttention against SDPA, and the exact-cache sampler
(cached = uncached tokens, batch = singles, EOS, past the trained length, cost)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import SPECIAL, UniformBlockBackbone, VOCAB, call_main, error_lines, packed_batch, tiny_args, tiny_transformer
from diffuse.errors import DiffuseError
from diffuse.core.metrics import NELBO
from diffuse.models.layers import BlockLayout
from diffuse.objectives.llada import LLaDA
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.sampling.block import BlockSampler
from diffuse.schedules import build_schedule

V = VOCAB - 1  # [MASK] is never a prediction


def batch_of(B, L, seed=0, docs=False):
    return packed_batch(B, L, seed, docs)


def gen(i):
    return torch.Generator().manual_seed(i)


UniformBackbone = UniformBlockBackbone


# -- the mask ---------------------------------------------------------------------------------------
def reference_visible(L, b):
    """The three parts of BD3LM's mask, written out position by position."""
    allowed = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            qn, kn = q < L, k < L  # noisy half first
            bq, bk = (q % L) // b, (k % L) // b
            if qn and kn:
                allowed[q, k] = bq == bk  # block-diagonal
            elif qn and not kn:
                allowed[q, k] = bk < bq  # offset block-causal
            elif not qn and not kn:
                allowed[q, k] = bk <= bq  # block-causal
    return allowed


@pytest.mark.parametrize("b", [1, 3, 4, 12])
def test_layout_mask_is_bd3lms_three_part_mask_with_documents(b):
    L = 12
    layout = BlockLayout.noisy_and_clean(L, b)
    assert torch.equal(layout.mask(None, 1)[0, 0], reference_visible(L, b) | torch.eye(2 * L, dtype=torch.bool))
    seg = batch_of(1, L, docs=True)["segment_ids"].repeat(1, 2)
    got = layout.mask(seg, 1)[0, 0]
    same_doc = (seg[0, :, None] == seg[0, None, :]) & (seg[0, None, :] > 0)
    assert torch.equal(got, (reference_visible(L, b) & same_doc) | torch.eye(2 * L, dtype=torch.bool))


def test_flex_attention_equals_sdpa_with_the_boolean_mask():
    """FlexAttention (compiled, on CPU) against SDPA with the explicit boolean mask: block layouts,
    documents and padding, causal, plain; and a wrong layout differs (the comparison can fail)."""
    sdpa, flex = tiny_transformer(seed=3), tiny_transformer(seed=3, attention="flex")
    L = 12
    batch = batch_of(2, L, docs=True)
    x = torch.cat([batch["input_ids"]] * 2, 1)
    seg = batch["segment_ids"].repeat(1, 2)
    with torch.no_grad():
        for b in (1, 4, 12):
            layout = BlockLayout.noisy_and_clean(L, b)
            torch.testing.assert_close(flex(ids=x, segment_ids=seg, layout=layout),
                                       sdpa(ids=x, segment_ids=seg, layout=layout), rtol=0, atol=1e-5)
        torch.testing.assert_close(flex(ids=x, segment_ids=seg, causal=True), sdpa(ids=x, segment_ids=seg, causal=True),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(flex(ids=x, segment_ids=seg), sdpa(ids=x, segment_ids=seg), rtol=0, atol=1e-5)
        wrong = (flex(ids=x, segment_ids=seg, layout=BlockLayout.noisy_and_clean(L, 4))
                 - sdpa(ids=x, segment_ids=seg, layout=BlockLayout.noisy_and_clean(L, 3))).abs().max()
    assert wrong > 1e-2


# -- the NELBO identities ---------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("b", [1, 4])
def test_uniform_predictor_block_nelbo_is_ln_v(schedule, b):
    obj = MaskedDiscrete(build_schedule(schedule), SPECIAL, block_size=b)
    batch, metric = batch_of(256, 32), NELBO()
    for i in range(8):
        out = obj.loss(UniformBackbone(), batch, gen(i), train=False)
        metric.update(out.nll_sum, out.n_tokens)
    a = lambda t: float(obj.schedule.alpha(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    assert metric.compute()["nelbo"].item() == pytest.approx((a(obj.eps) - a(1.0)) * math.log(V), rel=0.015)


def test_llada_uniform_predictor_with_blocks_is_ln_v():
    obj = LLaDA(SPECIAL, build_schedule("linear"), block_size=4)
    out = [obj.loss(UniformBackbone(), batch_of(256, 32), gen(i)) for i in range(8)]
    assert sum(o.loss.item() for o in out) / 8 == pytest.approx(math.log(V), rel=0.015)


@pytest.mark.parametrize("make", [lambda b: MaskedDiscrete(build_schedule("cosine"), SPECIAL, block_size=b),
                                  lambda b: LLaDA(SPECIAL, build_schedule("linear"), block_size=b)])
def test_one_block_is_the_full_sequence_model(make):
    """block_size = L: the same t, masks, loss and bound as the full-sequence model, documents included."""
    model, batch = tiny_transformer(seed=1), batch_of(4, 16, docs=True)
    full, block = make(None), make(16)
    for train in (True, False):
        a, b = full.loss(model, batch, gen(5), train=train), block.loss(model, batch, gen(5), train=train)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.nll_sum, a.nll_sum, rtol=1e-5, atol=1e-6)
        assert int(a.n_tokens) == int(b.n_tokens)


@torch.no_grad()
def left_to_right_nll(model, ids):
    """The network's own left-to-right NLL: token i predicted from x_<i and [MASK] at i, causally."""
    total = 0.0
    for i in range(1, ids.shape[1]):
        z = torch.cat([ids[:, :i], torch.full((ids.shape[0], 1), SPECIAL.mask)], 1)
        logits = model.logits(model(ids=z, causal=True))[:, -1].float()
        logits[:, SPECIAL.mask] = float("-inf")
        total += -logits.log_softmax(-1).gather(1, ids[:, i:i + 1]).sum().item()
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def test_block_of_one_token_gives_the_autoregressive_nll():
    model, batch = tiny_transformer(seed=2), batch_of(2, 10, seed=4)
    obj = MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=1)
    ar_nll = left_to_right_nll(model, batch["input_ids"])
    with torch.no_grad():  # every token masked (t = 1): each term is exactly the AR conditional
        out = obj.loss(model, batch, gen(0), train=False, t_range=(1.0, 1.0))
    assert (out.nll_sum / out.n_tokens).item() == pytest.approx((1 - obj.eps) * ar_nll, rel=1e-5)
    big = {k: v.repeat(128, 1) for k, v in batch.items()}  # and in expectation over t and the masks
    with torch.no_grad():
        est = sum((o.nll_sum / o.n_tokens).item() for o in (obj.loss(model, big, gen(i), train=False)
                                                           for i in range(4))) / 4
    assert est == pytest.approx((1 - obj.eps) * ar_nll, rel=0.02)


def test_smaller_blocks_see_less_so_their_bound_differs():
    """Not the same number for b = 4 and b = L: the layout really changes what is predicted from what."""
    model, batch = tiny_transformer(seed=1), batch_of(4, 16)
    a = MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=4).loss(model, batch, gen(1), train=False)
    b = MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=16).loss(model, batch, gen(1), train=False)
    assert abs(a.nll_sum.item() - b.nll_sum.item()) > 1e-3


def test_corruption_level_is_the_blocks_own_so_every_accuracy_bucket_fills():
    """A t per block: the row's mask ratio would sit near one half; each token's level is its block's."""
    obj = MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=4)
    out = obj.loss(UniformBackbone(), batch_of(8, 128), gen(0), train=False)
    level = out.token_level
    assert (level < 0.3).any() and (level > 0.7).any() and level.max() <= 1.0


def test_time_conditioned_blocks_give_the_clean_copy_t_zero_on_every_path():
    """The t_range path (gradient analysis) draws t [B, 1]: the clean half still sees t = 0."""
    seen = []

    class Spy(UniformBackbone):
        time_conditioned = True

        def forward(self, ids=None, t=None, **kw):
            seen.append(t)
            return super().forward(ids=ids, t=t, **kw)

    obj = MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=4)
    for t_range in (None, (0.4, 0.6)):
        obj.loss(Spy(), batch_of(2, 8), gen(0), t_range=t_range)
        t = seen[-1]
        assert t.shape == (2, 16) and (t[:, 8:] == 0).all() and (t[:, :8] > 0).all()


def test_block_size_must_be_a_positive_integer():
    for bad in (0, -2, 2.5, True):
        with pytest.raises(DiffuseError, match="objective.block_size"):
            MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=bad)


# -- the sampler ------------------------------------------------------------------------------------
def block_objective(b=4):
    return MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=b)


PROMPTS = [[1, 2, 3, 4, 5, 6], [7], [], [8, 9, 10]]


@pytest.mark.parametrize("options", [{}, {"threshold": 0.05}, {"remasking": "random"}, {"temperature": 0.0}])
@pytest.mark.parametrize("b", [1, 3, 4])
def test_cached_decoding_gives_exactly_the_tokens_of_uncached_decoding(options, b):
    model, obj = tiny_transformer(seed=4), block_objective(b)
    cached = BlockSampler(steps=3, use_cache=True, **options).generate(model, obj, PROMPTS, 10, seed=7)
    plain = BlockSampler(steps=3, use_cache=False, **options).generate(model, obj, PROMPTS, 10, seed=7)
    assert torch.equal(cached.tokens, plain.tokens) and torch.equal(cached.lengths, plain.lengths)
    assert cached.positions < plain.positions  # the cache never re-runs the prefix


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_equals_singles_with_prompts_of_different_lengths(use_cache):
    model, obj = tiny_transformer(seed=5), block_objective(4)
    sampler = BlockSampler(steps=2, use_cache=use_cache)
    batch = sampler.generate(model, obj, PROMPTS, 9, seed=11)
    for r, p in enumerate(PROMPTS):
        alone = sampler.generate(model, obj, [p], 9, seed=11 + r)
        assert torch.equal(batch.tokens[r], alone.tokens[0]), r
        assert int(batch.nfe_per_row()[r]) == alone.nfe


class EosAfter(nn.Module):
    """Predicts EOS with certainty at generated slot `stop_at` of the first row, token 1 elsewhere."""

    time_conditioned = False
    supports_block_layout = True

    def __init__(self, width, stop_at):
        super().__init__()
        self.vocab_size, self.anchor = VOCAB, nn.Parameter(torch.zeros(()))
        self.width, self.stop_at, self.cache_len = width, stop_at, None

    def new_cache(self, max_length):
        return tiny_transformer().new_cache(max_length)

    def forward(self, ids, t=None, segment_ids=None, cache=None, layout=None, **_):
        start = cache.offset if cache is not None else 0
        if cache is not None:
            cache.extend(segment_ids)
        pos = torch.arange(start, start + ids.shape[1])
        out = torch.zeros(*ids.shape, VOCAB)
        out[..., 1] = 10.0
        slot = pos - self.width
        out[0, slot == self.stop_at, SPECIAL.eos] = 20.0
        return out + 0 * self.anchor

    def logits(self, hidden):
        return hidden


def test_eos_ends_a_sample_and_its_lengths_are_its_own():
    prompts = [[1, 2], [3, 4]]
    model = EosAfter(width=3, stop_at=5)  # row 0: EOS at slot 5 (second block of 4)
    out = BlockSampler(steps=2, temperature=0.0).generate(model, block_objective(4), prompts, 16, seed=0)
    assert out.lengths.tolist() == [5, 16]
    assert (out.tokens[0, 5:] == SPECIAL.pad).all() and (out.tokens[1] == 1).all()
    rows = out.nfe_per_row().tolist()  # row 0 stops after its second block: 1 prefill + 2 blocks (2 steps + 1 commit)
    assert rows[0] == 1 + 3 + 2 and rows[1] == 1 + 4 * 2 + 3


def test_generation_runs_past_the_trained_length_with_the_cache():
    model, obj = tiny_transformer(seed=6), block_objective(4)
    out = BlockSampler(steps=2).generate(model, obj, [[1, 2]], 40, seed=0)  # 3 + 40 positions
    assert out.tokens.shape == (1, 40)
    # each generated token costs (steps + 1) positions at most, the prompt once: no re-run of the prefix
    assert out.positions <= 3 + 40 * 3


def test_samplers_and_backbones_that_do_not_fit_are_refused():
    from diffuse.run.build import build_sampler

    with pytest.raises(DiffuseError, match="sampler=remask decodes absorbing"):
        build_sampler({"name": "remask"}, block_objective(4))
    with pytest.raises(DiffuseError, match="sampler=block decodes block_absorbing"):
        build_sampler({"name": "block"}, MaskedDiscrete(build_schedule("linear"), SPECIAL))
    assert type(build_sampler({}, block_objective(4))).__name__ == "BlockSampler"


def test_cli_trains_and_samples_a_block_model_and_refuses_mamba2(corpus, tmp_path):
    run = tmp_path / "run"
    r = call_main("diffuse.train", *tiny_args(corpus, run, "objective.block_size=4", "trainer.max_steps=2"))
    assert r.returncode == 0, r
    r = call_main("diffuse.sample", f"ckpt={run}/checkpoints/last.ckpt", "num_samples=2", "length=12", "steps=2",
                  f"hydra.run.dir={tmp_path / 'sample'}")
    assert r.returncode == 0, r
    bad = call_main("diffuse.train", *tiny_args(corpus, tmp_path / "m", "model=mamba2_tiny", "objective.block_size=4"))
    assert bad.returncode == 2
    assert error_lines(bad.stderr) and "model=mamba2 cannot train objective.block_size=4" in error_lines(bad.stderr)[0]


def test_hf_backbone_trains_blocks_and_decodes_them_without_a_cache():
    """model=hf takes the layout as its 4D mask: one block = the full-sequence model; sampler=block runs
    uncached (HF models here have no diffuse KV cache) and refuses the cache in one line."""
    from diffuse.models.hf import HFCausalLM

    tiny = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
    torch.manual_seed(0)
    model, batch = HFCausalLM(vocab_size=VOCAB, config=tiny).eval(), batch_of(2, 12, docs=True)
    make = lambda b: MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=b)  # noqa: E731
    with torch.no_grad():
        a, b = make(None).loss(model, batch, gen(2), train=False), make(12).loss(model, batch, gen(2), train=False)
    torch.testing.assert_close(b.nll_sum, a.nll_sum, rtol=1e-5, atol=1e-5)
    out = BlockSampler(steps=2).generate(model, make(4), [[1, 2], [3]], 8, seed=0)  # use_cache null: none here
    assert out.tokens.shape == (2, 8)
    assert torch.equal(out.tokens, BlockSampler(steps=2, use_cache=False).generate(model, make(4), [[1, 2], [3]], 8).tokens)
    with pytest.raises(DiffuseError, match="sampler.use_cache=true, but HFCausalLM has no KV cache"):
        BlockSampler(steps=2, use_cache=True).generate(model, make(4), [[1]], 8)
