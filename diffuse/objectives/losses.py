"""Cross-entropy where a loss is taken, and only there: the output head runs on the selected positions,
a chunk of them at a time, so a training step never holds a [B, L, V] tensor.

`selected_cross_entropy(backbone, hidden, where, targets, weight, exclude)` returns Σ weight·NLL over the
positions `where` (differentiable) plus, detached, each selected token's NLL, whether the argmax is its
target and the top probability (the token stats of a LossOutput). `exclude` (the [MASK] id) is left out
of the softmax: its logit is −∞, exactly as SUBS and the AR loss want.

Gradients are taken chunk by chunk during the forward, as Liger's fused linear cross-entropy does: the
loss is a weighted sum whose weights are known up front, so d loss / d logits = w·(softmax − onehot) per
chunk; one `autograd.grad` through `backbone.logits` turns it into the chunk's gradient for the hidden
states and the head's parameters, and the chunk's logits are freed. Backward only scales what was kept
by the upstream gradient. Any `backbone.logits` works (a linear head, a tied embedding, a test stub). A
loss taken with grad enabled pays the head's backward work at once (under torch.no_grad, as in validation,
nothing of it runs). A chunk holds two [C, V] buffers (its logits, and the softmax turned into the
gradient in place), C = B·L/16 positions with 2^20 ≤ C·V ≤ 2^24; the head's parameter gradient is
summed over chunks. Measured against torch.utils.checkpoint per chunk (which recomputes every chunk's logits in
backward: one more head matmul) on CPU at V = 32k, B·L = 2048, d = 256: this is 1.3–1.4× faster per
step at the same peak (experiments/bench/loss_memory.py has the numbers against full logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CHUNK_FRACTION = 16  # a chunk is 1/16 of the B·L positions (its two buffers: 1/8 of a B×L×V tensor) …
CHUNK_MIN_ELEMENTS = 2**20  # … but no fewer logits than this (4 MB in fp32: small problems run in one chunk)
CHUNK_MAX_ELEMENTS = 2**24  # … and no more than this (64 MB)


@dataclass
class SelectedCE:
    total: torch.Tensor  # Σ weight·nll over the selected positions: a differentiable scalar
    nll: torch.Tensor  # [N] per selected token (row-major order of `where`), detached
    correct: torch.Tensor  # [N] float: the argmax is the target
    confidence: torch.Tensor  # [N] the largest probability


def selected_cross_entropy(backbone, hidden: torch.Tensor, where: torch.Tensor, targets: torch.Tensor,
                           weight: torch.Tensor | float | None = None, exclude: int | None = None,
                           chunk: int | None = None) -> SelectedCE:
    """hidden [B, L, D], where [B, L] bool, targets [B, L] long, weight broadcastable to [B, L] (no grad)."""
    h, y = hidden[where], targets[where]
    w = torch.ones(y.shape, device=y.device) if weight is None else (
        torch.broadcast_to(torch.as_tensor(weight, device=y.device), where.shape)[where].float())
    chunk = chunk or chunk_positions(where.numel(), getattr(backbone, "vocab_size", None))
    params = tuple(p for p in backbone.parameters() if p.requires_grad) if isinstance(backbone, nn.Module) else ()
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad or params):
        total, nll, correct, conf = _ChunkedCrossEntropy.apply(backbone.logits, chunk, exclude, h, y, w, *params)
    else:
        total, nll, correct, conf, _ = _chunked(backbone.logits, chunk, exclude, h, y, w, None)
    return SelectedCE(total, nll, correct, conf)


def chunk_positions(positions: int, vocab: int | None) -> int:
    """Positions per chunk: 1/16 of B·L, with the chunk's logits between the two bounds above."""
    chunk = -(-positions // CHUNK_FRACTION)
    if vocab:
        chunk = min(max(chunk, CHUNK_MIN_ELEMENTS // vocab), CHUNK_MAX_ELEMENTS // vocab)
    return max(1, chunk)


def _chunked(logits_fn, chunk, exclude, h, y, w, params, grad_h: bool = False):
    """Stats and NLL of every chunk; with `params` (a tuple, maybe empty) also d Σ w·nll for h and them."""
    n = h.shape[0]
    nll, conf, correct = (torch.empty(n, dtype=torch.float32, device=h.device) for _ in range(3))
    dh = torch.zeros_like(h) if grad_h else None
    grads = [None] * len(params or ())
    for s in range(0, n, chunk):
        part = slice(s, s + chunk)
        got = _one_chunk(logits_fn, exclude, h[part], y[part], w[part], params, grad_h,
                         (nll[part], correct[part], conf[part]))
        if got is not None:
            if grad_h and got[0] is not None:
                dh[part] = got[0]
            for i, g in enumerate(got[1:]):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
        del got  # this chunk's gradients are summed: free them before the next chunk
    return (nll * w).sum(), nll, correct, conf, (dh, grads)


def _one_chunk(logits_fn, exclude, h, y, w, params, grad_h, stats):
    """One chunk's logits and one more [C, V] buffer: the softmax, turned into the gradient in place."""
    if params is not None:
        h = h.detach().requires_grad_(grad_h)
        with torch.enable_grad():
            out = logits_fn(h)
    else:
        out = logits_fn(h)
    logits = out.detach()  # read only: the head's graph may have saved it
    p = logits.to(torch.float32, copy=True)
    if exclude is not None:
        p[:, exclude] = float("-inf")
    top = p.amax(-1, keepdim=True)
    total = p.sub_(top).exp_().sum(-1, keepdim=True)
    p.div_(total)
    nll, correct, conf = stats
    nll.copy_((top + total.log()).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1).float())
    best, pred = p.max(-1)
    conf.copy_(best)
    correct.copy_(pred == y)
    if params is None or not out.requires_grad:
        return None
    g = p.mul_(w[:, None]).scatter_add_(1, y[:, None], -w[:, None])  # d Σ w·nll / d logits = w·(softmax − onehot)
    inputs = ([h] if grad_h else []) + list(params)
    got = torch.autograd.grad(out, inputs, g.to(out.dtype), allow_unused=True)
    return (got[0], *got[1:]) if grad_h else (None, *got)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_fn, chunk, exclude, h, y, w, *params):
        total, nll, correct, conf, (dh, grads) = _chunked(logits_fn, chunk, exclude, h, y, w, params,
                                                          grad_h=h.requires_grad)
        ctx.has = [g is not None for g in grads]
        ctx.save_for_backward(dh, nll, *[g for g in grads if g is not None])
        ctx.mark_non_differentiable(nll, correct, conf)
        return total, nll, correct, conf

    @staticmethod
    def backward(ctx, g_total, *_):
        dh, nll, *kept = ctx.saved_tensors
        kept = iter(kept)
        grads = [next(kept) * g_total if has else None for has in ctx.has]
        dw = nll * g_total if ctx.needs_input_grad[5] else None
        return (None, None, None, None if dh is None else dh * g_total, None, dw, *grads)
