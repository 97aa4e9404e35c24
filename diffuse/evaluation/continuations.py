"""log p(continuation | context) as lm-evaluation-harness asks for it (`loglikelihood`), for any diffuse model:
exact for autoregressive models, LLaDA's Monte-Carlo estimate for absorbing-state ("masked") diffusion.

A request is (context, continuation) token ids, the context starting with BOS. Rows are right-padded with PAD
under segment id 0 (invisible to the real tokens), and every random draw of a request comes from a generator
seeded by the request's own tokens: a score depends neither on its batch nor on the other requests.

Exact (an `autoregressive` process: objective=autoregressive, and objective=hybrid, whose clean row is an AR
model): one causal pass, log p(c | x) = Σ_j log p(c_j | x, c_<j) over V ([MASK] excluded, as the AR loss does);
greedy when every c_j is the argmax.

Monte Carlo (the `Absorbing` capability: masked_discrete, llada; DESIGN.md §7; LLaDA arXiv 2502.09992, eq. 6):
the context is never masked; row r masks exactly m_r of the k continuation tokens (a uniformly random subset)
and scores Σ_{masked j} (k / m_r) · log p_θ(c_j | x, z_r). Averaged over m ~ U{1..k} and the subsets this is the
ELBO of log p(c | x) (the any-order bound), so the mean of n rows is an unbiased estimate of it. The n rows are
n/2 antithetic pairs: one random permutation π of the continuation per pair, the first row masking π[:m], its
partner π[m−1:] (m' = k + 1 − m tokens: every token masked in at least one row of the pair), with m spread
evenly over 1..k (stratified: u_i = (u_0 + i/(n/2)) mod 1, m = ⌊u_i·k⌋ + 1). Block diffusion (objective.block_size
b): a noisy block sees only itself and the clean blocks before it, so the bound is a sum over blocks; each block's
continuation tokens get their own m, permutation and weight k_b/m_b in the same pass (stratified per block; one
count over the whole continuation would be unbiased too, a random order restricted to a block being one in it). `cfg_scale` w (off at 0):
logits = u + (1 + w)·(c − u), u the pass with the context (BOS excepted) masked, as LLaDA's evaluation does.
Greedy (LLaDA's check): from the continuation fully masked, commit the most confident position's argmax, one a
pass; greedy when that decodes the continuation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from diffuse.contracts import Absorbing, block_size_of, is_autoregressive
from diffuse.errors import DiffuseError

Request = tuple[list[int], list[int]]  # (BOS + context, continuation) token ids


@dataclass
class Score:
    logprob: float
    greedy: bool
    stderr: float = 0.0  # the Monte-Carlo standard error of `logprob` (0: exact)


def request_generator(seed: int, context: list[int], continuation: list[int]) -> torch.Generator:
    """A generator seeded by `seed` and the request's tokens: the same draws whatever batch or order it comes in."""
    digest = hashlib.sha256(f"{seed}|{context}|{continuation}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-padded with `pad` to one width, with segment ids (1 on tokens, 0 on padding)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    seg = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        seg[r, : len(row)] = 1
    return ids.to(device), seg.to(device)


def chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def scorer_for(module, batch_size: int = 16, mc_samples: int = 128, seed: int = 0, cfg_scale: float = 0.0):
    """The scorer of the module's objective: exact for an autoregressive process, Monte Carlo for an absorbing one."""
    objective = module.objective
    if is_autoregressive(objective):
        return ExactScorer(module.backbone, objective.special, batch_size)
    if isinstance(objective, Absorbing):
        return MonteCarloScorer(module.backbone, objective, batch_size, mc_samples, seed, cfg_scale)
    raise DiffuseError(f"objective={getattr(objective, 'registry_name', type(objective).__name__)} has no "
                       "loglikelihood estimator here (exact: autoregressive processes; Monte Carlo: absorbing ones); "
                       "its tasks of type generate_until and loglikelihood_rolling still run")


class ExactScorer:
    estimator = "exact"

    def __init__(self, backbone, special, batch_size: int = 16):
        self.backbone, self.special, self.batch_size = backbone, special, batch_size

    def describe(self) -> dict:
        return {"estimator": self.estimator}

    @torch.no_grad()
    def score(self, requests: list[Request]) -> list[Score]:
        device = next(self.backbone.parameters()).device
        out = []
        for chunk in chunks(requests, self.batch_size):
            ids, seg = padded([c + x for c, x in chunk], self.special.pad, device)
            hidden = self.backbone(ids=ids, segment_ids=seg, causal=True)
            for r, (context, continuation) in enumerate(chunk):
                # the hidden state at position j predicts token j + 1
                logits = self.backbone.logits(hidden[r, len(context) - 1 : len(context) + len(continuation) - 1])
                logp = log_probs_over_vocab(logits, self.special.mask)
                target = torch.tensor(continuation, device=device)
                out.append(Score(float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return out


def log_probs_over_vocab(logits: torch.Tensor, mask: int | None) -> torch.Tensor:
    logits = logits.double()
    if mask is not None and mask < logits.shape[-1]:
        logits[..., mask] = float("-inf")
    return logits.log_softmax(-1)


@dataclass
class Row:
    request: int
    clean: list[int]  # context + continuation
    masked: torch.Tensor  # [len(clean)] bool
    weight: torch.Tensor  # [len(clean)] float64: k_b / m_b on masked positions, 0 elsewhere
    ratio: torch.Tensor  # [len(clean)] float64: the masked fraction of the position's block's continuation


def check_estimator_args(mc_samples, cfg_scale) -> None:
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 2 or mc_samples % 2:
        raise DiffuseError(f"mc_samples={mc_samples} must be an even integer ≥ 2 (the rows come in antithetic pairs)")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or cfg_scale < 0:
        raise DiffuseError(f"cfg_scale={cfg_scale} must be a number ≥ 0 (0: no classifier-free guidance)")


class MonteCarloScorer:
    estimator = "monte_carlo"

    def __init__(self, backbone, objective, batch_size: int = 16, mc_samples: int = 128, seed: int = 0,
                 cfg_scale: float = 0.0):
        check_estimator_args(mc_samples, cfg_scale)
        self.backbone, self.objective, self.batch_size = backbone, objective, batch_size
        self.mc_samples, self.seed, self.cfg_scale = mc_samples, seed, float(cfg_scale)
        self.block_size = block_size_of(objective)
        self.special = objective.special

    def describe(self) -> dict:
        return {"estimator": "monte_carlo (LLaDA: exactly m of the k continuation tokens masked per row, "
                             "weight k/m, context never masked)",
                "mc_samples": self.mc_samples, "antithetic_pairs": True, "seed": self.seed,
                "cfg_scale": self.cfg_scale, "block_size": self.block_size,
                "greedy": "confidence decoding of the masked continuation, one token a pass"}

    def plan(self, context: list[int], continuation: list[int]) -> list[Row]:
        """The mc_samples masked rows of one request (see the module docstring)."""
        gen = request_generator(self.seed, context, continuation)
        n, start, k_all = self.mc_samples, len(context), len(continuation)
        positions = torch.arange(start, start + k_all)
        group = positions // self.block_size if self.block_size else torch.zeros(k_all, dtype=torch.long)
        masked = torch.zeros(n, start + k_all, dtype=torch.bool)
        weight = torch.zeros(n, start + k_all, dtype=torch.float64)
        ratio = torch.zeros(n, start + k_all, dtype=torch.float64)
        half = n // 2
        for g in group.unique().tolist():
            idx = positions[group == g]
            k = len(idx)
            u = (torch.rand((), generator=gen, dtype=torch.float64) + torch.arange(half, dtype=torch.float64) / half) % 1
            m = (u * k).floor().long().clamp_max(k - 1) + 1
            span = torch.arange(idx.min(), idx.max() + 1) if self.block_size else idx
            for i, mi in enumerate(m.tolist()):
                perm = idx[torch.randperm(k, generator=gen)]
                for r, chosen in ((2 * i, perm[:mi]), (2 * i + 1, perm[mi - 1 :])):
                    masked[r, chosen] = True
                    weight[r, chosen] = k / len(chosen)
                    ratio[r, span] = len(chosen) / k
        clean = context + continuation
        return [Row(-1, clean, masked[r], weight[r], ratio[r]) for r in range(n)]

    @torch.no_grad()
    def score(self, requests: list[Request]) -> list[Score]:
        rows = []
        for q, (context, continuation) in enumerate(requests):
            for row in self.plan(context, continuation):
                row.request = q
                rows.append(row)
        totals = torch.zeros(len(requests), self.mc_samples, dtype=torch.float64)
        seen = [0] * len(requests)
        for chunk in chunks(rows, self.batch_size):
            for row, value in zip(chunk, self._row_estimates(chunk, requests)):
                totals[row.request, seen[row.request]] = value
                seen[row.request] += 1
        greedy = self._greedy(requests)
        pairs = totals.view(len(requests), -1, 2).mean(-1)  # antithetic pairs are the independent draws
        stderr = pairs.std(-1) / math.sqrt(pairs.shape[1]) if pairs.shape[1] > 1 else torch.zeros(len(requests))
        return [Score(float(t.mean()), g, float(s)) for t, g, s in zip(totals, greedy, stderr)]

    # -- the network -----------------------------------------------------------------------------------
    def _t(self, ratio: torch.Tensor) -> torch.Tensor:
        """The time whose mask probability is `ratio` (what a time-conditioned backbone is told), per value."""
        floor = float(self.objective.mask_prob(torch.zeros((), dtype=torch.float64)))
        table = {v: self.objective.t_for_mask_prob(min(1.0, max(v, floor))) for v in ratio.unique().tolist()}
        return ratio.clone().apply_(lambda v: table[v]).float()

    def _log_probs(self, z: torch.Tensor, clean: torch.Tensor, seg: torch.Tensor, ratio: torch.Tensor,
                   contexts: list[int], where: torch.Tensor) -> torch.Tensor:
        """log p_θ(x0 | z) [N, V] at the `where` positions, with classifier-free guidance when cfg_scale > 0."""
        t = self._t(ratio).to(z.device)
        t = t if self.block_size else t.max(1, keepdim=True).values  # one t per row for the full-sequence model

        def logits(z_in, clean_in):  # a self-conditioned backbone: both passes, the network val/nelbo measures
            h = self.objective.conditioned_hidden(self.backbone, z_in, t, {"input_ids": clean_in, "segment_ids": seg},
                                                  train=False)
            return self.backbone.logits(h[where]).double()

        out = logits(z, clean)
        if self.cfg_scale > 0:
            hide = torch.zeros_like(where)
            for r, n in enumerate(contexts):
                hide[r, 1:n] = True  # the context after BOS
            mask = torch.full_like(z, self.special.mask)
            uncond = logits(torch.where(hide, mask, z), torch.where(hide, mask, clean))
            out = uncond + (1.0 + self.cfg_scale) * (out - uncond)
        return self.objective.log_probs(out, z[where])

    def _row_estimates(self, chunk: list[Row], requests: list[Request]) -> torch.Tensor:
        device = next(self.backbone.parameters()).device
        clean, seg = padded([row.clean for row in chunk], self.special.pad, device)
        width = clean.shape[1]

        def stack(attr):
            return torch.stack([torch.nn.functional.pad(getattr(r, attr), (0, width - len(r.clean))) for r in chunk])

        masked, weight, ratio = stack("masked").to(device), stack("weight").to(device), stack("ratio")
        z = torch.where(masked, torch.full_like(clean, self.special.mask), clean)
        logp = self._log_probs(z, clean, seg, ratio, [len(requests[r.request][0]) for r in chunk], masked)
        token_logp = logp.gather(-1, clean[masked][:, None]).squeeze(-1)
        per_row = torch.zeros(len(chunk), dtype=torch.float64, device=device)
        per_row.index_add_(0, masked.nonzero()[:, 0], token_logp * weight[masked])
        return per_row.cpu()

    def _greedy(self, requests: list[Request]) -> list[bool]:
        device = next(self.backbone.parameters()).device
        out = []
        for chunk in chunks(requests, self.batch_size):
            clean, seg = padded([c + x for c, x in chunk], self.special.pad, device)
            todo = torch.zeros_like(clean, dtype=torch.bool)
            for r, (context, continuation) in enumerate(chunk):
                todo[r, len(context) : len(context) + len(continuation)] = True
            k = todo.sum(1, keepdim=True).double().clamp_min(1)
            z = torch.where(todo, torch.full_like(clean, self.special.mask), clean)
            while (z == self.special.mask).any():
                still = z == self.special.mask
                ratio = (still.sum(1, keepdim=True) / k).cpu().expand(z.shape).clone()
                logp = self._log_probs(z, clean, seg, ratio, [len(c) for c, _ in chunk], still)
                conf, pred = logp.max(-1)
                scores = torch.full(z.shape, float("-inf"), dtype=torch.float64, device=device)
                scores[still] = conf.double()
                tokens = torch.zeros_like(z)
                tokens[still] = pred
                rows = still.any(1).nonzero().squeeze(1)
                best = scores[rows].argmax(1)
                z[rows, best] = tokens[rows, best]
            out += ((z == clean) | ~todo).all(1).tolist()
        return out
