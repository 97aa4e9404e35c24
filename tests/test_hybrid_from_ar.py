"""The recipe TiDAR and DiffusionGemma use: start the hybrid from a trained autoregressive model. `init_from=` an
`objective=autoregressive` run loads into `objective=hybrid` (same backbone, same tokenizer, [MASK] included), and
before any step the hybrid's val/nelbo — its AR NLL — is the AR run's own, to float precision."""

from __future__ import annotations

import json

import pytest

from conftest import call_main, tiny_args


def test_a_hybrid_started_from_an_ar_run_begins_with_its_nll(corpus, tmp_path):
    ar = call_main("diffuse.train", *tiny_args(corpus, tmp_path / "ar", "objective=autoregressive",
                                               "trainer.max_steps=3"))
    assert ar.returncode == 0, ar
    hybrid = call_main("diffuse.train", *tiny_args(corpus, tmp_path / "hybrid", "objective=hybrid",
                                                   "objective.block_size=4", "trainer.max_steps=0",
                                                   f"init_from={tmp_path / 'ar' / 'checkpoints' / 'last.ckpt'}"))
    assert hybrid.returncode == 0, hybrid
    nll = [json.loads((tmp_path / run / "metrics.json").read_text())["val/nelbo"] for run in ("ar", "hybrid")]
    assert nll[1] == pytest.approx(nll[0], rel=1e-6)
