"""One decode loop for the reverse of the absorbing (masked) process; `ancestral`, `remask`, `llada` and
`threshold` are commit rules over it (registered in masked.py and llada.py).

The generated span x ∈ (V ∪ {[MASK]})^length starts all [MASK] after [BOS, prompt…]. It is cut into
blocks of `span_length` (None: one block, the whole span) decoded left to right; the `steps` are split
across blocks as evenly as possible, earlier blocks first, and only the current block's masks are
eligible. A block of N steps runs on its own time grid t_0 = 1 > … > t_N = ε (uniform in t). Step t → s:

    log p = log p_θ(x0 | z_t)                 one forward pass (two with guidance)
    x̃_ℓ ~ p_ℓ^(1/T) (Gumbel-max; T = 0: argmax),   confidence c_ℓ = p_ℓ(x̃_ℓ)
    x_C ← x̃_C for the committed set C ⊆ eligible masks; committed tokens never change

and the last step of a block commits every mask it has left. The rules choose C:

- `RevealByChance` (ancestral, MDLM): each mask ℓ ∈ C independently with probability
  (α(s) − α(t)) / (1 − α(t)).
- `CommitTopK` (remask, llada, threshold): C = the k highest scores among the n eligible masks
  (score c: `low_confidence`, LLaDA's name, the least confident stay masked; or u ~ U(0, 1): `random`),
  plus every mask with c ≥ τ when a threshold τ is set. The count k per step is
  - `schedule_share` (remask; llada with a non-linear schedule): k = round(n·(1 − (1−α(s))/(1−α(t))));
    linear gives about 1/j of the masks when j steps are left, cosine_maskgit few early, cosine many;
  - `even_share` (llada with the linear schedule): k = ⌈n / j⌉ with j steps left, i.e. a block of n
    masks in N steps commits ⌊n/N⌋ per step and one more on its first n mod N steps (LLaDA's
    `get_num_transfer_tokens`: 10 in 4 steps → 3, 3, 2, 2);
  - `one_per_step` with τ (threshold, parallel decoding): every mask with c ≥ τ, or the most confident
    one when none reaches τ (the top-1 is inside the τ-set whenever that set is not empty).
- `EntropyBounded` (eb; the EB-sampler, arXiv 2505.24857): sort the eligible masks by the entropy H_ℓ of
  p_ℓ (untempered, untruncated) ascending and commit the largest k with Σ_{i≤k} H_i − max_{i≤k} H_i ≤ γ, at
  least one (base.eb_accept; sampler=entropy_bound keeps the same set on uniform-state canvases).

Guidance (`cfg_scale` w > 0): u = log-probs of the canvas with the prompt masked (BOS kept), and the
step uses log softmax(u + (w + 1)(log p − u)); each step then costs two passes.

Logits reuse: when the backbone is not time-conditioned and a step committed nothing, the next step
reuses its log-probs (no forward pass), drawing fresh proposals from them.

Caches (`cache`: null, prefix, dual; canvas_cache.py): the loop asks its canvas for each step's log-probs;
without a cache every pass runs the whole canvas, with Fast-dLLM's prefix or dual cache the first pass of
a block runs it whole and refreshes the cache, and the block's other passes feed only the block (dual) or
the block and what follows it (prefix), attending to cached K/V (approximate). `SampleOutput.positions`
counts the positions fed per row.

Batch = singles: every draw happens in the frame of the generated span [B, length] from one generator
per row (base.row_generators), and only rows that still decode the current block draw, so a row's
random stream and tokens do not depend on the other rows; `RowCost` counts each row's passes alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from diffuse.contracts import ABSORBING, NoisingObjective
from diffuse.core.checks import check_range
from diffuse.errors import DiffuseError
from diffuse.sampling.base import (
    RowCost,
    SampleOutput,
    check_temperature,
    check_truncation,
    eb_accept,
    rand_rows,
    row_generators,
    sample_tokens,
    token_entropy,
    trim_at_eos,
    truncate,
)
from diffuse.sampling.canvas_cache import check_cache, make_canvas
from diffuse.sampling.trace import recorder
from diffuse.schedules import Schedule, build_schedule

REMASKING = ("low_confidence", "random")
# the number of masks a step commits: (n masks left per row [B], t, s, steps left in the block) → k [B]
Count = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def top_k_rows(score: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of each row's k[r] highest scores (ties broken by position)."""
    order = score.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return ranks < k[:, None]


def schedule_share(schedule: Schedule) -> Count:
    """k = round(n·(1 − (1−α(s))/(1−α(t)))): the share of the masks the schedule reveals on t → s."""

    def count(n, t, s, left):
        a_t, a_s = schedule.alpha(t), schedule.alpha(s)
        frac = float(1.0 - (1.0 - a_s) / (1.0 - a_t).clamp_min(1e-12))
        return torch.round(n.double() * frac).long()

    return count


def even_share(n, t, s, left):
    """k = ⌈n / left⌉: n masks in N steps, ⌊n/N⌋ a step and one more on the first n mod N steps."""
    return torch.div(n + left - 1, left, rounding_mode="floor")


def one_per_step(n, t, s, left):
    return torch.ones_like(n)


class RevealByChance:
    """Ancestral (MDLM): each eligible mask is revealed with probability (α(s) − α(t)) / (1 − α(t))."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def choose(self, masked, proposal, logp, t, s, gens, left):
        a_t, a_s = self.schedule.alpha(t), self.schedule.alpha(s)
        p_reveal = float((a_s - a_t) / (1.0 - a_t).clamp_min(1e-12))
        return masked & (rand_rows(gens, masked.shape[1:], masked.device, active=masked.any(1)) < p_reveal)


class CommitTopK:
    """The k = count(…) highest-scoring eligible masks, plus every one with confidence ≥ `threshold`."""

    def __init__(self, count: Count, remasking: str = "low_confidence", threshold: float | None = None):
        if remasking not in REMASKING:
            raise DiffuseError(f"sampler.remasking={remasking!r} must be low_confidence or random")
        self.count, self.remasking, self.threshold = count, remasking, threshold

    def choose(self, masked, proposal, logp, t, s, gens, left):
        conf = logp.gather(-1, proposal[..., None]).squeeze(-1).exp()
        if self.remasking == "random":
            score = rand_rows(gens, masked.shape[1:], masked.device, active=masked.any(1))
        else:
            score = conf
        reveal = top_k_rows(score.masked_fill(~masked, float("-inf")), self.count(masked.sum(1), t, s, left))
        if self.threshold is not None:
            reveal |= conf >= self.threshold
        return reveal & masked


class EntropyBounded:
    """EB-sampler: the eligible masks of lowest entropy whose Σ H − max H ≤ `gamma` (at least one)."""

    def __init__(self, gamma: float):
        self.gamma = float(check_range("sampler.gamma", gamma, 0))

    def choose(self, masked, proposal, logp, t, s, gens, left):
        return eb_accept(token_entropy(logp), self.gamma, eligible=masked)


class AbsorbingSampler:
    """The decode loop of the module docstring; a registered sampler chooses its rule and options."""

    processes = (ABSORBING,)
    requires = (NoisingObjective,)  # `predict` on the canvas
    any_length = False  # the canvas is at most the trained data.seq_len

    def __init__(self, rule, *, steps: int, schedule, temperature: float, eps: float,
                 span_length: int | None = None, cfg_scale: float = 0.0, cache: str | None = None,
                 top_k: int | None = None, top_p: float | None = None):
        if int(steps) <= 0:
            raise DiffuseError(f"sampler.steps={steps} must be positive")
        if span_length is not None and int(span_length) <= 0:
            raise DiffuseError(f"sampler.span_length={span_length} must be positive (or null: one block)")
        if cfg_scale < 0:
            raise DiffuseError(f"sampler.cfg_scale={cfg_scale} must be ≥ 0")
        check_range("sampler.eps", eps, 0, 1, high_open=True)  # the end of the time grid 1 → eps
        self.rule, self.steps, self.temperature, self.eps = rule, int(steps), check_temperature(temperature), eps
        self.schedule = schedule if isinstance(schedule, Schedule) else build_schedule(schedule)
        self.span_length = None if span_length is None else int(span_length)
        self.cfg_scale = float(cfg_scale)
        self.cache = check_cache(cache)
        self.top_k, self.top_p = check_truncation(top_k, top_p)  # proposals only; confidences stay untruncated

    def blocks(self, length: int) -> list[tuple[int, int, int]]:
        """(start, end, steps) per block; steps split as evenly as possible, earlier blocks first."""
        size = min(self.span_length or length, length)
        n = math.ceil(length / size)
        if self.steps < n:
            raise DiffuseError(f"sampler.steps={self.steps} is fewer than the {n} blocks of "
                               f"sampler.span_length={size} in a length of {length}")
        per, extra = divmod(self.steps, n)
        return [(b * size, min(length, (b + 1) * size), per + (b < extra)) for b in range(n)]

    @torch.no_grad()
    def generate(self, backbone, objective, prompts, length, seed=0) -> SampleOutput:
        special = objective.special
        device = next(backbone.parameters()).device
        canvas = make_canvas(self.cache, backbone, objective, prompts, length, self.cfg_scale)
        gens = row_generators(seed, len(prompts), device)
        reusable = not backbone.time_conditioned
        nfe, logp, cost = 0, None, RowCost(len(prompts), reusable, device)
        rec = recorder(self)  # OFF unless traced (sampling/trace.py)

        x = torch.full((len(prompts), length), special.mask, dtype=torch.long, device=device)
        for lo, hi, steps in self.blocks(length):
            eligible = torch.zeros(length, dtype=torch.bool, device=device)
            eligible[lo:hi] = True
            grid = self.schedule.grid(steps, self.eps, device)
            first = True  # the block's first pass (a cache refreshes there)
            for i in range(steps):
                masked = (x == special.mask) & eligible
                active = masked.any(1)  # rows still decoding this block; the others wait for the batch
                if not active.any():
                    break
                if logp is None or not reusable:
                    logp, passes = canvas.predict(x, grid[i].float().expand(len(prompts), 1), (lo, hi), first)
                    nfe += passes
                    cost.forward(active, passes)
                    first = False
                proposal = sample_tokens(truncate(logp, self.top_k, self.top_p), self.temperature, gens,
                                         active=active)
                if i == steps - 1:
                    reveal = masked  # the block's last step commits the rest
                else:
                    reveal = self.rule.choose(masked, proposal, logp, grid[i], grid[i + 1], gens, steps - i) & masked
                if reveal.any():
                    x = torch.where(reveal, proposal, x)
                rec.step(x, nfe=nfe, committed=reveal, logp=logp, proposal=proposal, t=grid[i])
                if reveal.any():
                    logp = None  # the input changed: the next step needs a fresh forward pass
                    cost.changed(reveal.any(1))
        tokens, lengths = trim_at_eos(x, special)
        return SampleOutput(tokens, lengths, nfe, [list(p) for p in prompts], cost.per_row, canvas.positions)
