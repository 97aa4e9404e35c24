"""A run started from a checkpoint never silently does something else than the user asked or the config records:
a tokenizer override that contradicts the checkpoint is refused (and the tokenizer really used is recorded), and
a diffuse.distill round is not resumed as plain training (its loss and learning rate would change under it)."""

from __future__ import annotations

import pytest
import torch

from conftest import call_main, error_lines, tiny_args


@pytest.fixture(scope="module")
def byte_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("byte_run")
    result = call_main("diffuse.train", *tiny_args(corpus, run, "trainer.max_steps=2"))
    assert result.returncode == 0, result
    return run / "checkpoints" / "last.ckpt"


def _args(corpus, run_dir, *extra):
    # tiny_args without its tokenizer=byte: the tokenizer is the checkpoint's, or the override under test
    return [a for a in tiny_args(corpus, run_dir, "trainer.max_steps=1", *extra) if a != "tokenizer=byte"]


def test_init_from_with_a_contradicting_tokenizer_override_is_one_line(byte_run, corpus, tmp_path):
    result = call_main("diffuse.train", *_args(corpus, tmp_path, f"init_from={byte_run}", "tokenizer=bpe"))
    assert result.returncode == 2, result
    assert error_lines(result.stderr) == [
        "error: init_from was trained with tokenizer=byte ({'name': 'byte'}); a run started from it uses that "
        "tokenizer: drop the tokenizer override"]


def test_init_from_records_the_tokenizer_it_really_uses(byte_run, corpus, tmp_path):
    result = call_main("diffuse.train", *_args(corpus, tmp_path, f"init_from={byte_run}"))  # the default is bpe
    assert result.returncode == 0, result
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["diffuse"]["config"]["tokenizer"]["name"] == "byte"


def test_a_distillation_round_is_not_resumed_as_plain_training(byte_run, corpus, tmp_path):
    ckpt = torch.load(byte_run, weights_only=True)
    ckpt["diffuse"]["config"]["distill"] = {"name": "sdtt", "teacher": "teacher.ckpt"}
    round_ckpt = tmp_path / "round1.ckpt"
    torch.save(ckpt, round_ckpt)
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path / "run", f"ckpt_path={round_ckpt}",
                                                   "trainer.max_steps=4"))
    assert result.returncode == 2, result
    assert error_lines(result.stderr) == [
        f"error: checkpoint {round_ckpt} is a round of diffuse.distill (method=sdtt): resume it by running the "
        "same python -m diffuse.distill command again (it continues unfinished rounds)"]
