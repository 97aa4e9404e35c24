"""MDLM's and TDLM's reverse processes of masked (absorbing-state) diffusion, on the one decode loop of
absorbing.py with the whole generation as one block and `steps` steps on t_0 = 1 > … > t_N = ε:

- `ancestral` (MDLM): on t → s each masked position is revealed with probability
  (α(s) − α(t)) / (1 − α(t)), its token drawn from p_θ(x0 | z_t); the last step fills the rest.
- `remask` (TDLM / confidence): on t → s commit k = round(n_masked·(1 − (1−α(s))/(1−α(t)))) positions,
  those whose sampled token is most confident (`low_confidence`) or random ones (`random`), plus every
  position whose confidence ≥ `confidence_threshold` when set; the last step fills the rest.

Defaults are those of conf/sampler/ancestral.yaml and conf/sampler/remask.yaml.
"""

from __future__ import annotations

from diffuse.core.checks import check_range
from diffuse.registry import SAMPLERS
from diffuse.sampling.absorbing import (
    AbsorbingSampler,
    CommitTopK,
    RevealByChance,
    schedule_share,
)
from diffuse.schedules import build_schedule


@SAMPLERS.register("ancestral")
class AncestralSampler(AbsorbingSampler):
    def __init__(self, steps: int = 64, schedule: str = "linear", temperature: float = 1.0, eps: float = 1e-3,
                 top_k: int | None = None, top_p: float | None = None):
        schedule = build_schedule(schedule)
        super().__init__(RevealByChance(schedule), steps=steps, schedule=schedule, temperature=temperature, eps=eps,
                         top_k=top_k, top_p=top_p)


@SAMPLERS.register("remask")
class RemaskSampler(AbsorbingSampler):
    def __init__(self, steps: int = 64, schedule: str = "cosine_maskgit", temperature: float = 1.0,
                 remasking: str = "low_confidence", confidence_threshold: float | None = None, eps: float = 1e-3,
                 top_k: int | None = None, top_p: float | None = None):
        check_range("sampler.confidence_threshold", confidence_threshold, 0, 1, low_open=True, null="no threshold")
        schedule = build_schedule(schedule)
        rule = CommitTopK(schedule_share(schedule), remasking, confidence_threshold)
        super().__init__(rule, steps=steps, schedule=schedule, temperature=temperature, eps=eps, top_k=top_k,
                         top_p=top_p)
