"""The lean loss (head and cross-entropy on the loss positions only, chunked) equals the full-logits loss in
value and gradient, and never builds a [B, L, V] tensor."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import SPECIAL, VOCAB, tiny_transformer
from diffuse.objectives import losses
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.llada import LLaDA
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.schedules import build_schedule


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_MIN_ELEMENTS", 1)  # ≤ 7 positions a chunk: many chunks, a ragged last
    monkeypatch.setattr(losses, "CHUNK_MAX_ELEMENTS", 7 * VOCAB)


def packed_batch(B=3, L=24, seed=0, prompt=False):
    """Rows of two documents [BOS … EOS BOS … EOS] then padding; an optional 3-token prompt per document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 36, (B, L), generator=g)
    seg = torch.ones_like(ids)
    seg[:, 11:] = 2
    seg[:, L - 3:] = 0
    ids[:, 0], ids[:, 11], ids[:, 10], ids[:, L - 4] = SPECIAL.bos, SPECIAL.bos, SPECIAL.eos, SPECIAL.eos
    ids[:, L - 3:] = SPECIAL.pad
    out = {"input_ids": ids, "segment_ids": seg}
    if prompt:
        pm = torch.zeros_like(ids)
        pm[:, 1:4], pm[:, 12:15] = 1, 1
        out["prompt_mask"] = pm
    return out


def reference_absorbing(obj, backbone, batch, gen, train):
    """The loss from the full SUBS log-probabilities `predict` gives, written from the formulas."""
    x0 = batch["input_ids"]
    t = obj.sample_t(x0, gen, train)
    z = obj.corrupt(x0, t, obj.draw_noise(x0, gen), batch)
    logp = obj.predict(backbone, z, t, batch)
    masked, maskable = z == SPECIAL.mask, obj.maskable(batch)
    ce = torch.where(masked, -logp.gather(-1, x0[..., None]).squeeze(-1), 0.0)
    if isinstance(obj, MaskedDiscrete):
        nll = (ce * obj.schedule.weight(t) * (1 - obj.eps)).sum()
        return nll / maskable.sum(), nll
    p = obj.mask_prob(t).float()
    nll = (ce * (1 - obj.eps) * -obj.schedule.alpha_prime(t) / p).sum()
    if not obj.importance_weighting:
        return ce.sum() / masked.sum(), nll
    if "prompt_mask" not in batch:
        return (ce / p).sum() / maskable.sum(), nll
    per_sample = []  # SFT: each sample's Σ CE/p over its answer length, averaged over samples
    for b in range(x0.shape[0]):
        for s in batch["segment_ids"][b].unique().tolist():
            answer = (batch["segment_ids"][b] == s) & maskable[b]
            if s > 0 and answer.any():
                per_sample.append((ce[b] / p[b])[answer].sum() / answer.sum())
    return torch.stack(per_sample).mean(), nll


def reference_ar(obj, backbone, batch, gen, train):
    ids, seg = batch["input_ids"], batch["segment_ids"]
    logits = backbone.logits(backbone(ids=ids, segment_ids=seg, causal=True))[:, :-1].float()
    logits[..., SPECIAL.mask] = float("-inf")
    nll = -logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    where = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return nll[where].mean(), nll[where].sum()


CASES = {
    "masked_linear": (lambda: MaskedDiscrete(build_schedule("linear"), SPECIAL), False),
    "masked_cosine_per_token": (lambda: MaskedDiscrete(build_schedule("cosine"), SPECIAL,
                                                       single_ratio_per_sequence=False), False),
    "llada": (lambda: LLaDA(SPECIAL, build_schedule("linear")), False),
    "llada_cosine_clamped": (lambda: LLaDA(SPECIAL, build_schedule("cosine"), min_mask_ratio=0.3), False),
    "llada_no_iw": (lambda: LLaDA(SPECIAL, build_schedule("linear"), importance_weighting=False), False),
    "llada_sft": (lambda: LLaDA(SPECIAL, build_schedule("linear")), True),
    "llada_sft_no_iw": (lambda: LLaDA(SPECIAL, build_schedule("linear"), importance_weighting=False), True),
    "autoregressive": (lambda: Autoregressive(SPECIAL), False),
}


def loss_and_grads(fn, model):
    loss, nll = fn()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), nll.detach(), grads


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("train", [True, False])
def test_lean_loss_equals_full_logits_loss_in_value_and_gradient(case, train):
    make, prompt = CASES[case]
    obj, batch = make(), packed_batch(prompt=prompt)
    model = tiny_transformer(tie_weights=False)
    reference = reference_ar if isinstance(obj, Autoregressive) else reference_absorbing
    for seed in range(3):
        lean = loss_and_grads(lambda: (lambda o: (o.loss, o.nll_sum))(
            obj.loss(model, batch, torch.Generator().manual_seed(seed), train=train)), model)
        full = loss_and_grads(lambda: reference(obj, model, batch, torch.Generator().manual_seed(seed), train), model)
        assert float(lean[0]) == pytest.approx(float(full[0]), rel=1e-5)
        assert float(lean[1]) == pytest.approx(float(full[1]), rel=1e-5)
        for g, ref in zip(lean[2], full[2]):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("case", ["masked_linear", "llada_sft", "autoregressive"])
def test_token_stats_and_no_grad_path_agree(case):
    make, prompt = CASES[case]
    obj, batch, model = make(), packed_batch(prompt=prompt), tiny_transformer()
    out = obj.loss(model, batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        quiet = obj.loss(model, batch, torch.Generator().manual_seed(0))
    assert torch.equal(out.loss.detach(), quiet.loss) and torch.equal(out.token_confidence, quiet.token_confidence)
    if isinstance(obj, Autoregressive):
        ids, seg = batch["input_ids"], batch["segment_ids"]
        logits = model.logits(model(ids=ids, segment_ids=seg, causal=True))[:, :-1]
        targets, where = ids[:, 1:], (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    else:
        x0, gen = batch["input_ids"], torch.Generator().manual_seed(0)
        t = obj.sample_t(x0, gen)
        z = obj.corrupt(x0, t, obj.draw_noise(x0, gen), batch)
        logits, targets, where = obj.predict(model, z, t, batch), x0, z == SPECIAL.mask
    logits = logits.float().index_fill(-1, torch.tensor([SPECIAL.mask]), float("-inf"))
    probs = logits[where].softmax(-1)
    torch.testing.assert_close(out.token_confidence, probs.max(-1).values)
    assert torch.equal(out.token_correct, (probs.argmax(-1) == targets[where]).float())


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor over the vocabulary (last dim V) that an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        over_v = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.shape[-1:] == (VOCAB,)]
        self.numel = max([self.numel, *over_v])
        return out


@pytest.mark.parametrize("case", ["masked_linear", "llada_sft", "autoregressive"])
def test_no_tensor_over_the_vocabulary_at_every_position(case):
    """Forward and backward never hold more than a chunk of logits (≤ 7 positions here, of 3·24)."""
    make, prompt = CASES[case]
    obj, batch = make(), packed_batch(prompt=prompt)
    model = tiny_transformer(d_model=4, n_heads=2)  # the head's weight and its gradient [4, V] stay below 7·V
    B, L = batch["input_ids"].shape
    with LargestTensor() as lean:
        obj.loss(model, batch, torch.Generator().manual_seed(0)).loss.backward()
    assert lean.numel <= 7 * VOCAB < B * L * VOCAB // 8
    with LargestTensor() as full:  # the test can fail: the full path does build one
        (reference_ar if isinstance(obj, Autoregressive) else reference_absorbing)(
            obj, model, batch, torch.Generator().manual_seed(0), True)[0].backward()
    assert full.numel >= (B * (L - 1)) * VOCAB
