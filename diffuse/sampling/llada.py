"""LLaDA's reverse process (confidence remasking in semi-autoregressive blocks) and threshold (parallel)
decoding, on the one decode loop of absorbing.py. Both fit any absorbing-state objective (llada,
masked_discrete).

- `llada`: the generated span is cut into blocks of `span_length` (null: one block), decoded left to
  right; `steps` are split across blocks as evenly as possible, earlier blocks first, and only the
  current block's masks are eligible. Each step commits the k most confident sampled tokens
  (`low_confidence`: the *least* confident stay masked) or k random ones (`random`), where
  - schedule=linear (the default): a block of n masks in N steps commits ⌊n/N⌋ tokens per step and one
    more on its first n mod N steps, as LLaDA's reference `get_num_transfer_tokens` (10 in 4 steps:
    3, 3, 2, 2; 12 in 5: 3, 3, 2, 2, 2);
  - any other schedule: the remask rule on the block's own time grid t_0 = 1 > … > t_N = ε,
    k = round(n_masked·(1 − (1−α(s))/(1−α(t)))) (cosine_maskgit few early, cosine many early).
  Optional classifier-free guidance `cfg_scale` w: unconditional = the prompt masked, log-probs
  u + (w+1)(c − u), two passes per step.
- `threshold`: commit every eligible masked token whose confidence ≥ `threshold`, at least the most
  confident one per step; the last step of a block commits the rest. `steps` is then only a cap, so
  confident models spend fewer forward passes. Blocks and guidance as for `llada`.
- `eb` (EB-sampler, arXiv 2505.24857): commit the eligible masks of lowest predictive entropy H whose
  Σ H − max H ≤ `gamma`, at least one per step; the last step of a block commits the rest. Like `threshold`,
  `steps` is a cap: γ = 0 commits one token a step (more only where H = 0), a large γ everything at once.

Both take `cache` (null, prefix or dual): Fast-dLLM's approximate KV caches for full-sequence
bidirectional transformers (canvas_cache.py). The first pass of each block runs the whole canvas and
refreshes the cache; the block's other passes feed the block and the suffix (prefix) or the block alone
(dual). Faster, not exact: the cached K/V saw the block as it was at its first step.

Defaults are those of conf/sampler/llada.yaml, conf/sampler/threshold.yaml and conf/sampler/eb.yaml.
"""

from __future__ import annotations

from diffuse.errors import DiffuseError
from diffuse.registry import SAMPLERS
from diffuse.sampling.absorbing import (
    AbsorbingSampler,
    CommitTopK,
    EntropyBounded,
    even_share,
    one_per_step,
    schedule_share,
)
from diffuse.schedules import LinearSchedule, build_schedule


@SAMPLERS.register("llada")
class LLaDASampler(AbsorbingSampler):
    def __init__(self, steps: int = 64, span_length: int | None = 32, schedule: str = "linear",
                 temperature: float = 1.0, remasking: str = "low_confidence", cfg_scale: float = 0.0,
                 eps: float = 1e-3, cache: str | None = None, top_k: int | None = None, top_p: float | None = None):
        schedule = build_schedule(schedule)
        count = even_share if isinstance(schedule, LinearSchedule) else schedule_share(schedule)
        super().__init__(CommitTopK(count, remasking), steps=steps, schedule=schedule, temperature=temperature,
                         eps=eps, span_length=span_length, cfg_scale=cfg_scale, cache=cache, top_k=top_k, top_p=top_p)


@SAMPLERS.register("threshold")
class ThresholdSampler(AbsorbingSampler):
    def __init__(self, threshold: float = 0.9, steps: int = 64, span_length: int | None = None,
                 temperature: float = 1.0, cfg_scale: float = 0.0, eps: float = 1e-3, cache: str | None = None,
                 top_k: int | None = None, top_p: float | None = None):
        if not 0.0 < threshold <= 1.0:
            raise DiffuseError(f"sampler.threshold={threshold} must lie in (0, 1]")
        # the schedule only places the time grid (uniform in t for every schedule) given to the backbone
        super().__init__(CommitTopK(one_per_step, "low_confidence", float(threshold)), steps=steps,
                         schedule="linear", temperature=temperature, eps=eps, span_length=span_length,
                         cfg_scale=cfg_scale, cache=cache, top_k=top_k, top_p=top_p)


@SAMPLERS.register("eb")
class EBSampler(AbsorbingSampler):
    def __init__(self, gamma: float = 0.1, steps: int = 64, span_length: int | None = None,
                 temperature: float = 1.0, cfg_scale: float = 0.0, eps: float = 1e-3, cache: str | None = None,
                 top_k: int | None = None, top_p: float | None = None):
        # the schedule only places the time grid (uniform in t) given to time-conditioned backbones
        super().__init__(EntropyBounded(gamma), steps=steps, schedule="linear", temperature=temperature, eps=eps,
                         span_length=span_length, cfg_scale=cfg_scale, cache=cache, top_k=top_k, top_p=top_p)
