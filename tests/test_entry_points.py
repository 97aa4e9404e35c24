"""What every entry point owes a user before it does any work: a required key left out is one line, and a knob
of the checkpoint's own sampler (`sampler.<key>=…` without `sampler=<name>`) is taken, on every command."""

from __future__ import annotations

import json

import pytest

from conftest import call_main, error_lines, tiny_args


@pytest.mark.parametrize("module, key", [("diffuse.sample", "ckpt"), ("diffuse.evaluate", "ckpt"),
                                         ("diffuse.compare", "a"), ("diffuse.distill", "teacher"),
                                         ("diffuse.export", "ckpt")])
def test_a_required_key_left_out_is_one_line(module, key):
    result = call_main(module)
    assert result.returncode == 2, result
    assert error_lines(result.stderr) == [f"error: {key} is required: give {key}=… on the command line"]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def llada_ckpt(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("llada")
    result = call_main("diffuse.train", *tiny_args(corpus, run, "objective=llada", "trainer.max_steps=2"))
    assert result.returncode == 0, result
    return run / "checkpoints" / "last.ckpt"


def test_sample_takes_a_knob_of_the_checkpoints_own_sampler(llada_ckpt, tmp_path):
    result = call_main("diffuse.sample", f"ckpt={llada_ckpt}", "num_samples=1", "length=16", "sampler.steps=4",
                       "sampler.span_length=8", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result
    row = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert row["sampler"] == "llada" and row["nfe"] == 4


def test_a_knob_the_sampler_does_not_take_is_one_line(llada_ckpt, tmp_path):
    result = call_main("diffuse.sample", f"ckpt={llada_ckpt}", "sampler.nope=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result
    assert error_lines(result.stderr)[0].startswith("error: sampler 'llada' got unknown key(s) nope")


def test_evaluate_and_compare_take_sampler_knobs(llada_ckpt, tmp_path):
    common = ["num_samples=1", "length=16", "limit_batches=1", "t_samples=1", "progress=false", "sampler.steps=4"]
    result = call_main("diffuse.evaluate", f"ckpt={llada_ckpt}", *common, f"hydra.run.dir={tmp_path / 'e'}")
    assert result.returncode == 0, result
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["quality"]["nfe"] == 4
    result = call_main("diffuse.compare", f"a={llada_ckpt}", f"b={llada_ckpt}", *common,
                       f"hydra.run.dir={tmp_path / 'c'}")
    assert result.returncode == 0, result


def test_train_takes_a_knob_of_the_objectives_own_sampler(corpus, tmp_path):
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "objective=llada", "trainer.max_steps=1",
                                                   "sampler.steps=3", "--cfg", "job"))
    assert result.returncode == 0, result
    assert "steps: 3" in result.stdout


def test_flex_attention_training_on_cpu_is_one_line(corpus, tmp_path):
    """torch has no FlexAttention backward on CPU: a traceback at the first backward before."""
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "objective.block_size=16", "model.attention=flex",
                                                   "model.dropout=0", "trainer.max_steps=1"))
    assert result.returncode == 2, result
    assert error_lines(result.stderr) == ["error: model.attention=flex does not train on CPU (FlexAttention has no "
                                          "CPU backward in torch); train with model.attention=sdpa here, or on a GPU"]


def test_a_sampler_the_user_did_not_name_never_blocks_a_run(corpus, tmp_path):
    """recipe=tdlm names sampler=remask for its masked objective; its AR baseline (README) must still train."""
    import torch

    result = call_main("diffuse.train", "recipe=tdlm", "objective=autoregressive", "debug=default", "data=text",
                       f"data.path={corpus}", "tokenizer.vocab_size=300", "model.d_model=32", "model.n_layers=1",
                       "trainer.max_steps=1", "num_samples=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["diffuse"]["config"]["sampler"] == {}  # recorded as used: the objective's own (ar)


def test_a_sampler_the_user_named_that_does_not_fit_is_one_line(corpus, tmp_path):
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "objective=autoregressive", "sampler=remask"))
    assert result.returncode == 2, result
    assert error_lines(result.stderr) == ["error: sampler=remask decodes absorbing processes, but objective="
                                          "autoregressive runs a autoregressive process; use sampler=ar"]


@pytest.mark.parametrize("override, line", [
    ("trainer.max_steps=-5", "error: trainer: `max_steps` must be a non-negative integer or -1 (infinite steps). "
                             "You passed in -5."),
    ("trainer.accumulate_grad_batches=0", "error: trainer.accumulate_grad_batches=0 must be an integer ≥ 1"),
])
def test_a_value_lightning_refuses_is_one_line(corpus, tmp_path, override, line):
    """Hydra's multi-line "Error in call to target" (or a ZeroDivisionError mid-fit) before."""
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, override))
    assert result.returncode == 2, result
    assert error_lines(result.stderr) == [line] and "Traceback" not in result.stderr


def test_bf16_mixed_precision_clips_a_fused_optimizers_gradients(corpus, tmp_path, monkeypatch):
    """trainer=gpu (bf16-mixed) with the default fused AdamW and gradient_clip_val=1: Lightning refused ("does not
    allow for gradient clipping because it performs unscaling of gradients internally") on any device."""
    import torch

    clipped = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clipped.append(a[1]) or real(*a, **k))
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "trainer=gpu", "trainer.accelerator=cpu",
                                                   "trainer.max_steps=2"))
    assert result.returncode == 0, result
    assert clipped == [1.0, 1.0]
