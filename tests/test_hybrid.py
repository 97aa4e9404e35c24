"""objective=hybrid (TiDAR): the [x ; d] layout and its mask (both streams, documents), FlexAttention against
SDPA on it, the AR term equal to objective=autoregressive, the draft term by hand (draft_noise=full) and the
uniform-predictor identities, documents and padding that never leak, and the CLI: training, val/nelbo,
sampling with its default sampler=speculative (the draft row drafts, the clean row verifies; tests/test_speculative.py
checks its exactness), mamba2 refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    SPECIAL,
    VOCAB,
    UniformBlockBackbone,
    call_main,
    error_lines,
    packed_batch,
    tiny_args,
    tiny_transformer,
)
from torch import nn

from diffuse.core.metrics import NELBO
from diffuse.errors import DiffuseError
from diffuse.models.layers import BlockLayout
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.hybrid import Hybrid
from diffuse.schedules import build_schedule

V = VOCAB - 1  # [MASK] is never a prediction


def hybrid(b=4, noise="full", schedule="linear", **kw):
    return Hybrid(build_schedule(schedule), SPECIAL, block_size=b, draft_noise=noise, **kw)


def batch_of(B, L, seed=0, docs=False):
    return packed_batch(B, L, seed, docs, doc_bos=True)


def gen(i):
    return torch.Generator().manual_seed(i)


# -- the mask ---------------------------------------------------------------------------------------
def reference_visible(L, b):
    """TiDAR's mask written out position by position: clean row first (token-causal), then the draft row
    (its block bidirectionally, the clean positions before the block)."""
    allowed = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            qc, kc = q < L, k < L
            i, j = q % L, k % L
            if qc and kc:
                allowed[q, k] = j <= i  # causal
            elif not qc and kc:
                allowed[q, k] = j < (i // b) * b  # the clean tokens of earlier blocks
            elif not qc and not kc:
                allowed[q, k] = i // b == j // b  # its own block, both ways
            # a clean query never sees the draft row
    return allowed


@pytest.mark.parametrize("b", [1, 3, 4, 12])
def test_layout_mask_is_tidars_mask_with_documents(b):
    L = 12
    layout = BlockLayout.clean_and_draft(L, b)
    eye = torch.eye(2 * L, dtype=torch.bool)
    assert torch.equal(layout.positions, torch.arange(L).repeat(2))
    assert torch.equal(layout.mask(None, 1)[0, 0], reference_visible(L, b) | eye)
    seg = batch_of(1, L, docs=True)["segment_ids"].repeat(1, 2)
    same_doc = (seg[0, :, None] == seg[0, None, :]) & (seg[0, None, :] > 0)
    assert torch.equal(layout.mask(seg, 1)[0, 0], (reference_visible(L, b) & same_doc) | eye)


def test_a_few_cells_by_hand():
    m = BlockLayout.clean_and_draft(8, 4).mask(None, 1)[0, 0]  # clean 0..7, draft 8..15
    assert m[3, 0] and m[3, 3] and not m[3, 4] and not m[3, 8]  # clean: causal, never the draft
    assert not m[8, 0] and m[8, 11] and not m[8, 12]  # draft block 0: no clean token, its block
    assert m[13, 3] and not m[13, 4] and m[13, 12] and m[13, 15] and not m[13, 11]  # draft block 1: clean 0..3


def test_flex_attention_equals_sdpa_on_the_hybrid_layout():
    """Forward only (FlexAttention has no CPU backward), documents and padding; a wrong block size differs."""
    sdpa, flex = tiny_transformer(seed=3), tiny_transformer(seed=3, attention="flex")
    L = 12
    batch = batch_of(2, L, docs=True)
    x = torch.cat([batch["input_ids"], torch.full_like(batch["input_ids"], SPECIAL.mask)], 1)
    seg = batch["segment_ids"].repeat(1, 2)
    with torch.no_grad():
        for b in (1, 4, 5, 12):
            layout = BlockLayout.clean_and_draft(L, b)
            torch.testing.assert_close(flex(ids=x, segment_ids=seg, layout=layout),
                                       sdpa(ids=x, segment_ids=seg, layout=layout), rtol=0, atol=1e-5)
        wrong = (flex(ids=x, segment_ids=seg, layout=BlockLayout.clean_and_draft(L, 4))
                 - sdpa(ids=x, segment_ids=seg, layout=BlockLayout.clean_and_draft(L, 3))).abs().max()
        # and the flex model's whole hybrid loss equals the SDPA model's
        a = hybrid(4, "sampled").loss(sdpa, batch, gen(1), train=False)
        f = hybrid(4, "sampled").loss(flex, batch, gen(1), train=False)
    assert wrong > 1e-2
    torch.testing.assert_close(f.loss, a.loss, rtol=0, atol=1e-5)


# -- the two terms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["full", "sampled"])
def test_the_ar_term_is_the_autoregressive_objectives_loss(noise):
    """Same weights, same batch: the AR term, val/nelbo's numbers and (with λ = 0) the gradients equal
    objective=autoregressive's: the clean row never sees the draft row."""
    model, batch = tiny_transformer(seed=1).train(), batch_of(3, 16, seed=2, docs=True)
    ar = Autoregressive(SPECIAL).loss(model, batch)
    ar.loss.backward()
    ar_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = hybrid(4, noise, diffusion_weight=0.0).loss(model, batch, gen(0))
    assert abs(out.metrics["ar_loss"].item() - ar.loss.item()) < 1e-6
    assert abs(out.nll_sum.item() - ar.nll_sum.item()) < 1e-5 and out.n_tokens == ar.n_tokens
    assert abs(out.loss.item() - ar.loss.item()) < 1e-6
    out.loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ar_grads[n], rtol=0, atol=1e-6, msg=n)
    # with λ > 0 the loss adds λ·diffusion
    both = hybrid(4, noise, diffusion_weight=0.5).loss(model, batch, gen(0))
    assert both.loss.item() == pytest.approx(ar.loss.item() + 0.5 * both.metrics["diffusion_loss"].item(), abs=1e-5)


class StubBackbone(nn.Module):
    """hidden = emb(id) + pos(position) + stream: a lookup, so the loss can be computed by hand; records its input."""

    time_conditioned = False
    supports_block_layout = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vocab_size = VOCAB
        self.emb, self.pos = nn.Embedding(VOCAB, 8), nn.Embedding(64, 8)
        self.stream = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, VOCAB, bias=False)
        self.seen = None

    def forward(self, ids=None, t=None, segment_ids=None, layout=None, **_):
        self.seen = ids
        return self.emb(ids) + self.pos(layout.positions) + (~layout.clean)[:, None] * self.stream

    def logits(self, hidden):
        return self.head(hidden)


def test_full_draft_loss_is_a_plain_ce_over_every_draft_position_by_hand():
    model, batch = StubBackbone(), batch_of(2, 10, seed=4, docs=True)
    x, L = batch["input_ids"], 10
    out = hybrid(4, "full").loss(model, batch, gen(0))
    maskable = (batch["segment_ids"] > 0) & (x != SPECIAL.bos)
    d = torch.where(maskable, SPECIAL.mask, x)
    assert torch.equal(model.seen, torch.cat([x, d], 1))  # [x ; d]: every maskable draft token masked
    with torch.no_grad():
        logits = model.head(model.emb(d) + model.pos(torch.arange(L)) + model.stream).double()
        logits[..., SPECIAL.mask] = -math.inf
        ce = -logits.log_softmax(-1).gather(-1, x[..., None])[..., 0]  # draft position i predicts x_i
        expected = ce[maskable].mean()
    assert out.metrics["diffusion_loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    assert out.metrics["draft_mask_ratio"].item() == 1.0


UniformBackbone = UniformBlockBackbone


@pytest.mark.parametrize("b", [1, 4])
def test_uniform_predictor_gives_ln_v_for_both_terms(b):
    batch = batch_of(8, 32)
    out = hybrid(b, "full").loss(UniformBackbone(), batch, gen(0), train=False)
    assert out.metrics["ar_loss"].item() == pytest.approx(math.log(V), abs=1e-6)
    assert (out.nll_sum / out.n_tokens).item() == pytest.approx(math.log(V), abs=1e-6)
    assert out.metrics["diffusion_loss"].item() == pytest.approx(math.log(V), abs=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_uniform_predictor_sampled_draft_nelbo_is_ln_v(schedule):
    obj, batch, metric = hybrid(4, "sampled", schedule), batch_of(256, 32), NELBO()
    diffusion = []
    for i in range(8):
        out = obj.loss(UniformBackbone(), batch, gen(i), train=False)
        metric.update(out.nll_sum, out.n_tokens)
        diffusion.append(out.metrics["diffusion_loss"].item())
    a = lambda t: float(obj.drafter.schedule.alpha(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    assert metric.compute()["nelbo"].item() == pytest.approx(math.log(V), abs=1e-6)  # the AR NLL
    assert sum(diffusion) / len(diffusion) == pytest.approx((a(obj.drafter.eps) - a(1.0)) * math.log(V), rel=0.015)


# -- documents and padding ---------------------------------------------------------------------------
def both_rows(model, obj, batch):
    """(clean, draft) hidden states of the hybrid's joint pass, with the full draft row."""
    x = batch["input_ids"]
    z = obj.drafter.corrupt(x, torch.ones(x.shape[0], 1), None, batch)
    with torch.no_grad():
        draft = obj.drafter.hidden(model, z, torch.ones(x.shape[0], 1), batch)
    return obj.drafter.take_clean(), draft


def test_padding_and_documents_never_leak():
    model, obj = tiny_transformer(seed=5), hybrid(4, "full")
    batch = batch_of(2, 12, seed=6)
    batch["segment_ids"][1, 8:] = 0
    batch["input_ids"][1, 8:] = SPECIAL.pad
    clean, draft = both_rows(model, obj, batch)
    alone = {k: v[1:, :8] for k, v in batch.items()}
    clean1, draft1 = both_rows(model, obj, alone)
    torch.testing.assert_close(clean[1:, :8], clean1, rtol=0, atol=1e-5)
    torch.testing.assert_close(draft[1:, :8], draft1, rtol=0, atol=1e-5)
    # a second document: changing the first document's tokens changes nothing of the second's, in either row
    docs = batch_of(1, 12, seed=7, docs=True)
    other = {k: v.clone() for k, v in docs.items()}
    other["input_ids"][0, 1:4] = (other["input_ids"][0, 1:4] + 1) % 36
    (c, d), (c2, d2) = both_rows(model, obj, docs), both_rows(model, obj, other)
    second = slice(4, 9)
    torch.testing.assert_close(c[:, second], c2[:, second], rtol=0, atol=1e-6)
    torch.testing.assert_close(d[:, second], d2[:, second], rtol=0, atol=1e-6)
    assert (c[:, 1:4] - c2[:, 1:4]).abs().max() > 1e-3  # (the change is seen where it may be)


def test_the_clean_row_is_the_causal_model_so_its_kv_is_ars_cache():
    """The joint pass's clean row equals a plain causal pass (what sampler=ar runs, with the KV cache)."""
    model, obj, batch = tiny_transformer(seed=8), hybrid(4), batch_of(2, 12, seed=9, docs=True)
    clean, _ = both_rows(model, obj, batch)
    with torch.no_grad():
        causal = model(ids=batch["input_ids"], segment_ids=batch["segment_ids"], causal=True)
        cache = model.new_cache(12)
        stepped = torch.cat([model(ids=batch["input_ids"][:, i:i + 1], segment_ids=batch["segment_ids"][:, i:i + 1],
                                   causal=True, cache=cache) for i in range(12)], 1)
    real = batch["segment_ids"] > 0
    torch.testing.assert_close(clean[real], causal[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(clean[real], stepped[real], rtol=0, atol=1e-5)


# -- configuration and samplers ------------------------------------------------------------------------
def test_speculative_self_drafting_is_the_default_ar_fits_and_diffusion_samplers_are_refused():
    from diffuse.contracts import DraftsForItself
    from diffuse.run.build import build_sampler
    from diffuse.sampling.ar import ARSampler
    from diffuse.sampling.drafters import HybridDrafter
    from diffuse.sampling.speculative import SpeculativeSampler

    obj = hybrid(4)
    sampler = build_sampler({}, obj)
    assert isinstance(sampler, SpeculativeSampler) and sampler.drafter is None
    assert isinstance(obj, DraftsForItself) and HybridDrafter(tiny_transformer(), obj).max_draft_length == 4
    assert isinstance(build_sampler({"name": "ar"}, obj), ARSampler)
    for name in ("block", "remask"):
        with pytest.raises(DiffuseError, match=f"sampler={name} decodes"):
            build_sampler({"name": name}, obj)
    model = tiny_transformer()
    out = sampler.generate(model, obj, [[SPECIAL.bos, 3], [SPECIAL.bos]], 6)
    assert out.tokens.shape == (2, 6)
    assert not model.training  # (tiny_transformer is in eval mode) the drafter leaves the mode to its caller
    model.train()
    sampler.generate(model, obj, [[3]], 2)
    assert model.training


@pytest.mark.parametrize("kw,message", [
    ({"block_size": 0}, "objective.block_size=0 must be an integer ≥ 1"),
    ({"block_size": None}, "objective.block_size=None must be an integer ≥ 1"),
    ({"draft_noise": "half"}, "objective.draft_noise='half' must be one of full, sampled"),
    ({"diffusion_weight": -1.0}, "objective.diffusion_weight=-1.0 must be a number ≥ 0"),
])
def test_bad_settings_are_one_line(kw, message):
    with pytest.raises(DiffuseError) as err:
        Hybrid(build_schedule("linear"), SPECIAL, **kw)
    assert str(err.value) == message


def test_cli_trains_reports_val_nelbo_samples_and_refuses_mamba2(corpus, tmp_path):
    run = tmp_path / "run"
    r = call_main("diffuse.train", *tiny_args(corpus, run, "objective=hybrid", "objective.block_size=4",
                                              "trainer.max_steps=4", "trainer.val_check_interval=4"))
    assert r.returncode == 0, r
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["val/nelbo"]) and metrics["val/bpt"] == pytest.approx(metrics["val/nelbo"] / math.log(2))
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/ar_loss" in header and "train/diffusion_loss" in header
    r = call_main("diffuse.sample", f"ckpt={run}/checkpoints/last.ckpt", "num_samples=2", "length=12",
                  f"hydra.run.dir={tmp_path / 'sample'}")
    assert r.returncode == 0, r
    r = call_main("diffuse.sample", f"ckpt={run}/checkpoints/last.ckpt", "num_samples=1", "length=8", "sampler=block",
                  f"hydra.run.dir={tmp_path / 'sample2'}")
    assert r.returncode == 2 and "sampler=block decodes block_absorbing" in error_lines(r.stderr)[0]
    bad = call_main("diffuse.train", *tiny_args(corpus, tmp_path / "m", "model=mamba2_tiny", "objective=hybrid"))
    assert bad.returncode == 2
    lines = error_lines(bad.stderr)
    assert lines and "model=mamba2 cannot train objective=hybrid" in lines[0], bad
