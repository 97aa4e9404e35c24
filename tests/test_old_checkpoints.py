"""A checkpoint written by diffuse before its run machinery moved into diffuse/run/ and diffuse/core/ (commit
21e1737; tests/fixtures/pre_layout/expected.json says how it was made) still loads in every command: the same
val/nelbo to float precision and the same samples under the same seed as the code that wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "pre_layout"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
CKPT = FIXTURE / "llada_byte.ckpt"


def test_old_checkpoint_evaluates_to_the_same_nelbo(tmp_path):
    proc = run_cli("diffuse.evaluate", f"ckpt={CKPT}", *EXPECTED["evaluate"]["args"], f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "eval.json").read_text())["likelihood"]
    want = EXPECTED["evaluate"]["likelihood"]
    assert got["val/tokens"] == want["val/tokens"]
    assert got["val/nelbo"] == pytest.approx(want["val/nelbo"], rel=1e-6)


def test_old_checkpoint_samples_the_same_text(tmp_path):
    proc = run_cli("diffuse.sample", f"ckpt={CKPT}", *EXPECTED["sample"]["args"], f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == EXPECTED["sample"]["texts"]


def test_old_checkpoint_naming_a_sampler_that_never_fitted_loads_with_the_objectives_own(tmp_path, caplog):
    """Checkpoints written before samplers were checked against the objective's process may name one that
    never fitted (it was silently replaced then): it is replaced again, and said so."""
    import torch

    from diffuse.run.load import load_run

    ckpt = torch.load(CKPT, weights_only=True)
    ckpt["diffuse"]["config"]["sampler"] = {"name": "ddim", "steps": 8}  # ddim decodes gaussian processes
    path = tmp_path / "odd_sampler.ckpt"
    torch.save(ckpt, path)
    with caplog.at_level("WARNING", logger="diffuse"):
        _, _, module = load_run(str(path))
    assert module.sampler.registry_name == "llada"
    assert any("sampler=ddim" in r.getMessage() and "using sampler=llada" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("objective, sampler, renamed", [
    ("llada", {"name": "llada", "steps": 4, "block_length": 8}, ("span_length", 8)),
    ("llada", {"steps": 4, "block_length": 8}, ("span_length", 8)),  # no name: the objective's own (llada)
    ("llada", {"name": "threshold", "block_length": 4}, ("span_length", 4)),
    ("continuous", {"name": "ddim", "temperature": 0.5}, ("noise_scale", 0.5)),
])
def test_sampler_keys_renamed_since_are_read_under_their_new_names(objective, sampler, renamed):
    """`sampler.block_length` (llada, threshold) is `span_length` now, not to be confused with training's
    `objective.block_size`; DDIM's `temperature` scaled noise, not a softmax: `noise_scale`."""
    from diffuse.run.checkpoint import stored_config

    ckpt = {"diffuse": {"config": {"objective": {"name": objective}, "sampler": dict(sampler)}}}
    upgraded = stored_config(ckpt)["sampler"]
    key, value = renamed
    assert upgraded[key] == value and set(upgraded) == (set(sampler) - {"block_length", "temperature"}) | {key}


def test_an_old_checkpoint_naming_block_length_samples_with_it(tmp_path):
    import torch

    from diffuse.run.load import load_run

    ckpt = torch.load(CKPT, weights_only=True)
    ckpt["diffuse"]["config"]["sampler"] = {"name": "llada", "steps": 4, "block_length": 8}
    path = tmp_path / "old_keys.ckpt"
    torch.save(ckpt, path)
    _, _, module = load_run(str(path))
    assert module.sampler.span_length == 8 and module.sampler.steps == 4
