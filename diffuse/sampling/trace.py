"""A sampler's trajectory, recorded on request: what the canvas looked like after every step.

A sampler calls one hook, `trace.recorder(self).step(...)`, once per step of its decode loop. Off (the
default) that is a method of `OFF` that returns at once: nothing is copied, no entropy computed, no draw
taken, so tokens and speed are those of an untraced run. On (`with recording(sampler) as traj:`), each
call copies the step to the CPU:

    canvas      [B, L] the generated span after the step (the mask id where still masked, pad where a row
                has not reached it yet: AR)
    committed   [B, L] positions given a token on this step: final for the masked and AR samplers; for those that
                revise (entropy_bound, DiffusionGemma: the EB-accepted positions), a later commit is a revision
    remasked    [B, L] positions set back to [MASK] on this step (none for samplers that never revise)
    renoised    [B, L] positions redrawn by noise on this step (uniform-state and Gaussian samplers)
    confidence  [B, L] p(the proposed token), where the sampler had a proposal (else None)
    entropy     [B, L] entropy (nats) of the predictive distribution the step drew from (else None)
    nfe         the forward passes run so far: the step's predictions came from pass number `nfe`
    t           the step's time (None where the sampler has no time grid)

Recording never touches a random generator, so batch = singles still holds, traced or not. `on_step`, when
given, sees each step as it is recorded (the demo streams it); raising from it stops the sampler (cancel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class Step:
    canvas: torch.Tensor
    committed: torch.Tensor
    remasked: torch.Tensor
    renoised: torch.Tensor
    confidence: torch.Tensor | None
    entropy: torch.Tensor | None
    nfe: int
    t: float | None = None


@dataclass
class Trajectory:
    steps: list[Step] = field(default_factory=list)
    sampler: str = ""

    def committed_at(self) -> torch.Tensor:
        """[B, L] the index of the last step that committed each position (−1: never)."""
        at = torch.full_like(self.steps[0].canvas, -1) if self.steps else torch.empty(0, 0, dtype=torch.long)
        for i, s in enumerate(self.steps):
            at[s.committed] = i
            at[s.remasked] = -1
        return at


class Recorder:
    def __init__(self, on_step: Callable[[Step], None] | None = None):
        self.trajectory, self.on_step = Trajectory(), on_step
        self._last: torch.Tensor | None = None

    def step(self, canvas, *, nfe: int, committed=None, remasked=None, renoised=None, logp=None, proposal=None,
             confidence=None, t=None, columns: slice | None = None, blank: int | None = None) -> None:
        """`canvas` [B, L]; masks [B, L], or over `columns` of it (a block sampler's block, AR's next token);
        `logp` [B, ·, V] the step's log-probabilities over `columns` (entropy; confidence of `proposal`).
        Any argument may be a function of nothing, called only here: what costs work to build (DDIM's rounding,
        the speculative sampler's rows) costs nothing untraced. `committed` left out: the `columns`, else
        every position that changed since the last step (on the first: all but those still `blank`)."""
        canvas, committed, remasked, renoised, logp, proposal, confidence = (
            x() if callable(x) else x for x in (canvas, committed, remasked, renoised, logp, proposal, confidence))
        canvas = canvas.detach().to("cpu", copy=True)
        none = torch.zeros_like(canvas, dtype=torch.bool)

        def full(x, fill, dtype):
            if x is None:
                return None
            x = x.detach().to("cpu", dtype)
            if columns is None or x.shape[-1] == canvas.shape[-1]:
                return x.clone()
            out = torch.full(canvas.shape, fill, dtype=dtype)
            out[:, columns] = x
            return out

        if committed is None and columns is not None:
            committed = none.clone()
            committed[:, columns] = True
        elif committed is None:
            last = self._last if self._last is not None and self._last.shape == canvas.shape else None
            committed = canvas != last if last is not None else (~none if blank is None else canvas != blank)
        entropy = None
        if logp is not None:
            lp = logp.detach().float()
            entropy = -(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1)
            if confidence is None and proposal is not None:
                confidence = lp.gather(-1, proposal[..., None]).squeeze(-1).exp()
        if isinstance(t, torch.Tensor):
            t = float(t.flatten()[0])
        s = Step(canvas, full(committed, False, torch.bool), full(remasked, False, torch.bool) if remasked is not None
                 else none.clone(), full(renoised, False, torch.bool) if renoised is not None else none.clone(),
                 full(confidence, float("nan"), torch.float32), full(entropy, float("nan"), torch.float32),
                 int(nfe), t)
        self._last = canvas
        self.trajectory.steps.append(s)
        if self.on_step is not None:
            self.on_step(s)


class _Off:
    """The recorder of an untraced run: every call returns at once."""

    def step(self, *args, **kwargs) -> None:
        return None


OFF = _Off()


def recorder(sampler) -> Recorder | _Off:
    """The sampler's recorder while `recording(sampler)` is open, else OFF (samplers call this once per generate)."""
    return sampler.__dict__.get("_trace_recorder") or OFF


@contextmanager
def recording(sampler, on_step: Callable[[Step], None] | None = None) -> Iterator[Trajectory]:
    """`with recording(sampler) as traj: sampler.generate(...)`: traj.steps filled as the sampler runs."""
    rec = Recorder(on_step)
    rec.trajectory.sampler = getattr(sampler, "registry_name", type(sampler).__name__)
    sampler._trace_recorder = rec
    try:
        yield rec.trajectory
    finally:
        sampler.__dict__.pop("_trace_recorder", None)
