"""One generation run on its own thread with its trajectory streamed step by step, and cancellable: what the demo
(diffuse/demo.py) shows, apart from any UI. The sampler is built per run, from the knobs a person set; a knob the
sampler does not take is left out (an AR sampler has no steps), a bad value is refused by the sampler in one line.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from diffuse.errors import DiffuseError
from diffuse.registry import SAMPLERS, accepts_keyword
from diffuse.run.build import build_sampler, sampler_fits
from diffuse.run.entry import check_context
from diffuse.run.load import load_run
from diffuse.sampling.trace import Step, recording


@dataclass
class Model:
    path: str
    cfg: object
    tokenizer: object
    module: object

    @property
    def special(self):
        return self.module.objective.special

    def own_sampler(self) -> str:
        return (self.cfg.get("sampler") or {}).get("name") or self.module.objective.default_sampler

    def sampler_names(self) -> list[str]:
        """The registered samplers that decode this checkpoint's process (those needing a drafter left out)."""
        names = [n for n in SAMPLERS.names() if sampler_fits(SAMPLERS.get(n), self.module.objective)]
        return [n for n in names if n != "speculative" or n == self.own_sampler()]

    def token(self, i: int) -> str:
        return self.tokenizer.decode([i])


def load_model(path: str) -> Model:
    cfg, tokenizer, module = load_run(path)
    return Model(str(path), cfg, tokenizer, module)


def sampler_from_knobs(model: Model, name: str, knobs: dict):
    """`name` built with the knobs it takes (None: the sampler's default); the checkpoint's own sampler keeps its
    trained settings underneath."""
    if name not in model.sampler_names():
        raise DiffuseError(f"sampler={name} does not decode this checkpoint; choose one of {model.sampler_names()}")
    cls = SAMPLERS.get(name)
    spec = dict(model.cfg.get("sampler") or {}) if name == model.own_sampler() else {}
    spec["name"] = name
    spec.update({k: v for k, v in knobs.items() if v is not None and accepts_keyword(cls, k)})
    try:
        return build_sampler(spec, model.module.objective)
    except (TypeError, ValueError) as e:  # a value of the wrong type the sampler did not check itself
        raise DiffuseError(f"sampler={name}: {e}") from None


class Cancelled(Exception):
    pass


@dataclass
class Run:
    """Start with `start()`; `events()` yields each recorded Step, then ends (`output`, `seconds` or `error` set)."""

    model: Model
    sampler: object
    prompt: list[int]
    length: int
    seed: int = 0
    steps: list[Step] = field(default_factory=list)
    output: object = None
    seconds: float = 0.0
    error: str | None = None

    def __post_init__(self):
        check_context(self.model.cfg, [self.prompt], self.length, False, self.sampler)
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._done = object()

    def _push(self, step: Step) -> None:
        if self._stop.is_set():
            raise Cancelled
        self.steps.append(step)
        self._queue.put(step)

    def _work(self) -> None:
        tic = time.perf_counter()
        try:
            with recording(self.sampler, on_step=self._push):
                self.output = self.model.module.generate([self.prompt], self.length, seed=self.seed,
                                                         sampler=self.sampler)
        except Cancelled:
            self.error = "cancelled"
        except DiffuseError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001  (shown in the page as one line, never a traceback)
            self.error = f"{type(e).__name__}: {e}"
        self.seconds = time.perf_counter() - tic
        self._queue.put(self._done)

    def start(self) -> Run:
        threading.Thread(target=self._work, daemon=True).start()
        return self

    def cancel(self) -> None:
        self._stop.set()

    def next(self, timeout: float = 0.25):
        """The next Step, None when none came within `timeout`, or StopIteration's sentinel `self` at the end."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        return self if item is self._done else item

    def tokens(self) -> int:
        return int(self.output.lengths.sum()) if self.output is not None else 0
