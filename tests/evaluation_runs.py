"""Tiny trained checkpoints for the evaluation tests (test_evaluate, test_compare, test_gradients):
one per objective, trained once per session through the real entry point on a small, very repetitive
corpus (so that a few dozen autoregressive steps learn real structure: a usable judge)."""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path

from conftest import call_main

BASE = Path(tempfile.mkdtemp(prefix="diffuse-eval-runs-"))
atexit.register(shutil.rmtree, BASE, ignore_errors=True)

SENTENCES = ("the cat sat on the mat.", "the dog ran to the old tree.", "a small bird sang in the light.",
             "we walk by the river at noon.")

OBJECTIVES = {
    "masked_discrete": (),
    "autoregressive": ("objective=autoregressive", "sampler=ar"),
    "llada": ("objective=llada", "sampler=llada", "sampler.span_length=4"),
    "continuous": ("objective=continuous", "sampler=ddim"),
}
STEPS = {"autoregressive": 40}  # the judge learns the corpus; the others need only a checkpoint


@functools.cache
def corpus() -> Path:
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 4))) for _ in range(160)]
    path = BASE / "repetitive.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def train_args(objective: str, run_dir: Path, *extra: str) -> list[str]:
    steps = STEPS.get(objective, 4)
    return ["debug=default", "data=text", f"data.path={corpus()}", "tokenizer=byte", "num_samples=0",
            f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "optim.lr=3e-3",
            "optim.warmup_steps=0", f"hydra.run.dir={run_dir}", *OBJECTIVES[objective], *extra]


def train(objective: str, run_dir: Path, *extra: str) -> Path:
    result = call_main("diffuse.train", *train_args(objective, run_dir, *extra))
    assert result.returncode == 0, result
    return run_dir


@functools.cache
def tiny_run(objective: str) -> Path:
    """The run directory of a tiny run (checkpoints/last.ckpt, metrics.csv, metrics.json)."""
    return train(objective, BASE / objective)


def ckpt(objective: str) -> str:
    return str(tiny_run(objective) / "checkpoints" / "last.ckpt")
