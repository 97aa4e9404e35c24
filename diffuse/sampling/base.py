"""What samplers share: the output record, per-row costs and random streams, the prompt canvas, EOS
trimming. The sampler contract itself is `diffuse.contracts.Sampler` (`processes` and `generate`).

Every sampler returns tokens and the number of forward passes (NFE). Randomness is drawn row by row
from one generator per sample, so a batch gives exactly what the same samples give one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Categorical

from diffuse.errors import DiffuseError


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B, L] generated tokens only (prompt excluded), pad after the first EOS
    lengths: torch.Tensor  # [B] tokens before the first EOS
    nfe: int  # forward passes of the network for the whole batch
    prompts: list[list[int]]
    # [B] the passes each row costs alone (a batch runs as long as its slowest row: threshold decoding,
    # EOS); None: every row cost `nfe`
    row_nfe: torch.Tensor | None = None
    # positions run through the network for the whole batch, per row (a pass over the whole canvas counts
    # its width; a cached pass only the positions it feeds): the work behind the NFE; None: not counted
    positions: int | None = None

    def nfe_per_row(self) -> torch.Tensor:
        return self.row_nfe if self.row_nfe is not None else torch.full((len(self.prompts),), self.nfe)


class RowCost:
    """The forward passes each row of a batch would cost alone. Alone, a row stops once nothing is left to
    decode and, where logits can be reused, runs the network only after its own input changed; in a batch
    it rides along on every pass, so the batch's NFE is that of its slowest row."""

    def __init__(self, n: int, reusable: bool, device):
        self.per_row = torch.zeros(n, dtype=torch.long, device=device)
        self.stale = torch.ones(n, dtype=torch.bool, device=device)  # input changed since the row's last pass
        self.reusable = reusable

    def forward(self, active: torch.Tensor, passes: int = 1) -> None:
        """One network call of `passes` forward passes; `active`: [B] rows that still decode."""
        self.per_row += passes * (active & self.stale if self.reusable else active)
        self.stale &= ~active  # a waiting row's input is not its own pass: alone, it would not have run

    def changed(self, rows: torch.Tensor) -> None:
        self.stale |= rows


def row_generators(seed: int, n: int, device) -> list[torch.Generator]:
    # row i of a batch drawn with `seed` is the single sample drawn with `seed + i`, so chunking a
    # request into batches of any size (diffuse.sample passes seed + chunk start) gives the same samples
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


def rand_rows(gens: list[torch.Generator], shape: tuple, device, active: torch.Tensor | None = None) -> torch.Tensor:
    """U(0, 1) draws of `shape` per row, from the row's own generator; rows not `active` draw nothing
    (they get 1.0), so a row waiting for its batch keeps its random stream as it would alone."""
    if active is None:
        return torch.stack([torch.rand(shape, generator=g, device=device) for g in gens])
    out = torch.ones((len(gens), *shape), device=device)
    for r in active.nonzero().squeeze(1).tolist():
        out[r] = torch.rand(shape, generator=gens[r], device=device)
    return out


def gumbel_max(logp: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """A draw from softmax(logp / T) by the Gumbel-max trick, given uniforms u ∈ [0, 1) of logp's shape (used
    up in place): argmax(logp / T − log(−log u))."""
    return (logp / temperature - torch.log(-torch.log(u.clamp_(1e-20, 1.0)))).argmax(-1)


def draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws from unnormalised weights [..., V] ≥ 0 (some positive) given uniforms u [...] in [0, 1):
    token j where cdf_{j−1} ≤ u·total < cdf_j; a zero-weight token is never drawn."""
    cdf = weights.cumsum(-1)
    idx = (cdf <= u[..., None] * cdf[..., -1:]).sum(-1)
    last = weights.shape[-1] - 1 - (weights > 0).flip(-1).long().argmax(-1)  # rounding at u → 1
    return torch.minimum(idx, last)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) per position [...] in nats (−inf logits, impossible tokens, count nothing): torch's
    Categorical, as transformers' DiffusionGemma computes it, so a tie at an entropy bound falls the same way."""
    return Categorical(logits=logits, validate_args=False).entropy()


def eb_accept(entropy: torch.Tensor, gamma: float, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """The EB-sampler's acceptance (arXiv 2505.24857), [B, L] bool: per row, the largest set of lowest-entropy
    eligible positions with Σ H − max H ≤ γ — the sum bounds their joint dependence — and at least one where a
    row has an eligible position. torch.sort ascending, as transformers' EntropyBoundSampler, so ties fall alike."""
    if eligible is not None:  # ineligible positions sort last as +inf: inf − inf is nan, never ≤ γ
        entropy = entropy.masked_fill(~eligible, float("inf"))
    sorted_h, order = torch.sort(entropy, dim=-1, descending=False)
    keep = sorted_h.cumsum(-1) - sorted_h <= gamma  # sorted ascending: the k-th term is the running max
    accepted = torch.zeros_like(keep).scatter(-1, order, keep)
    return accepted if eligible is None else accepted & eligible


def check_temperature(temperature) -> float:
    """`sampler.temperature` (or `temperature=`): a number ≥ 0, 0 meaning argmax. A negative one would be
    taken for argmax too by `sample_tokens`, silently: it is refused instead."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise DiffuseError(f"sampler.temperature={temperature} must be a number ≥ 0 (0: argmax)")
    return float(temperature)


def check_truncation(top_k, top_p) -> tuple[int | None, float | None]:
    """`sampler.top_k` (a positive integer) and `sampler.top_p` (in (0, 1]); null: no truncation."""
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise DiffuseError(f"sampler.top_p={top_p} must lie in (0, 1] (or null: no nucleus)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise DiffuseError(f"sampler.top_k={top_k} must be a positive integer (or null: no top-k)")
    return top_k, None if top_p is None else float(top_p)


def truncate(logp: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Log-probabilities outside the `top_k` most likely tokens, or outside the smallest set whose probability
    reaches `top_p` (nucleus), set to −inf; sampling renormalises over the rest."""
    if top_k:
        kth = logp.topk(min(top_k, logp.shape[-1]), dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_lp, order = logp.sort(-1, descending=True)
        probs = sorted_lp.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        logp = logp.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logp


def sample_tokens(logp: torch.Tensor, temperature: float, gens, active: torch.Tensor | None = None) -> torch.Tensor:
    """Draw from softmax(logp / T) with the Gumbel-max trick (T = 0: argmax). Only `active` rows draw
    (the others get the argmax): a row waiting for the rest of its batch must not use up its random
    stream, or it would continue differently from the same sample drawn alone."""
    if temperature <= 0:
        return logp.argmax(-1)
    if active is not None and not active.all():
        out, rows = logp.argmax(-1), active.nonzero().squeeze(1)
        if len(rows):
            out[rows] = sample_tokens(logp[rows], temperature, [gens[r] for r in rows.tolist()])
        return out
    return gumbel_max(logp, rand_rows(gens, logp.shape[1:], logp.device), temperature)


def masked_canvas(prompts: list[list[int]], length: int, special, device):
    """Rows [BOS, prompt…, MASK × length, PAD…] right-padded to one width, with segment ids
    (0 on padding, so it is invisible to the others). Returns ids, segment_ids, generation start per row."""
    if length <= 0:
        raise DiffuseError(f"sampler length={length} must be positive")
    heads = [[special.bos] + list(p) for p in prompts]
    width = max(len(h) for h in heads) + length
    ids = torch.full((len(heads), width), special.pad, dtype=torch.long, device=device)
    seg = torch.zeros_like(ids)
    for r, h in enumerate(heads):
        ids[r, : len(h)] = torch.tensor(h, device=device)
        ids[r, len(h) : len(h) + length] = special.mask
        seg[r, : len(h) + length] = 1
    starts = torch.tensor([len(h) for h in heads], device=device)
    return ids, seg, starts


def left_padded(prompts: list[list[int]], special, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [PAD…, BOS, prompt…] left-padded to one width W, with segment ids (0 on padding): every row's
    next token sits in column W, so a cache can be written in the same columns for every row (RoPE is
    relative and padding invisible, so a row's outputs do not depend on its padding)."""
    heads = [[special.bos] + list(p) for p in prompts]
    width = max(map(len, heads))
    ids = torch.full((len(heads), width), special.pad, dtype=torch.long, device=device)
    seg = torch.zeros_like(ids)
    for r, h in enumerate(heads):
        ids[r, width - len(h):] = torch.tensor(h, device=device)
        seg[r, width - len(h):] = 1
    return ids, seg


def take_generated(ids: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    idx = starts[:, None] + torch.arange(length, device=ids.device)
    return ids.gather(1, idx)


def trim_at_eos(tokens: torch.Tensor, special) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything after the first EOS becomes PAD; lengths count the tokens before it."""
    is_eos = tokens == special.eos
    after = is_eos.cumsum(1) > 0
    lengths = (~after).sum(1)
    return tokens.masked_fill(after, special.pad), lengths

