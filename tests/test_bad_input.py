"""Bad input: each is a one-line error naming the culprit, a non-zero exit code, no traceback.

Two cases run as real processes (`python -m …`); the rest call the same Hydra entry point
in-process (argv → compose → run → one-line error → exit code), which costs ~1 s instead of ~8 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import call_main, error_lines, run_cli, tiny_args


def assert_one_line_error(result, *culprits: str):
    stderr = result.stderr
    assert result.returncode not in (0, None), result
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])


def test_unknown_group_option_fails_through_the_cli_without_traceback():
    proc = run_cli("diffuse.train", "model=no_such_model", "hydra.run.dir=/tmp/diffuse-never-created")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert any("model/no_such_model" in line for line in proc.stderr.splitlines()[:3]), proc.stderr
    assert "transformer" in proc.stderr  # Hydra lists the options that do exist


def test_negative_seq_len_fails_through_the_cli(corpus, tmp_path):
    proc = run_cli("diffuse.train", *tiny_args(corpus, tmp_path, "data.seq_len=-1"))
    assert_one_line_error(proc, "data.seq_len=-1")
    assert proc.returncode == 2


def _files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n\nsecond paragraph\n".encode("latin-1"))
    return {"missing": tmp_path / "nope.txt", "empty": empty, "latin1": latin1}


CASES = {
    # name: (overrides given the corpus and the files above, culprits the message must name)
    "seq_len=0": (lambda c, f: ["data.seq_len=0"], ["data.seq_len=0"]),
    "missing file": (lambda c, f: [f"data.path={f['missing']}"], ["nope.txt", "does not exist"]),
    "empty file": (lambda c, f: [f"data.path={f['empty']}"], ["empty.txt", "empty"]),
    "non-UTF-8 file": (lambda c, f: [f"data.path={f['latin1']}"], ["latin1.txt", "UTF-8"]),
    "no data.path": (lambda c, f: ["data.path=null"], ["data.path"]),
    "vocab mismatch": (lambda c, f: ["+model.vocab_size=100"], ["model.vocab_size=100", "260"]),
    "unknown model key": (lambda c, f: ["+model.d_modle=64"], ["d_modle"]),
    "bad mask ratios": (lambda c, f: ["objective.min_mask_ratio=0.9", "objective.max_mask_ratio=0.5"],
                        ["min_mask_ratio=0.9"]),
    "missing ckpt_path": (lambda c, f: [f"ckpt_path={f['missing']}"], ["ckpt_path=", "nope.txt"]),
    "not a checkpoint": (lambda c, f: [f"ckpt_path={c}"], ["ckpt_path=", "corpus.txt"]),
    "hf tokenizer not found": (lambda c, f: ["tokenizer=hf", f"tokenizer.path={f['missing']}"],
                               ["tokenizer.path=", "nope.txt"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_training_input_is_a_one_line_error(case, corpus, tmp_path):
    overrides, culprits = CASES[case]
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path / "run", *overrides(corpus, _files(tmp_path))))
    assert_one_line_error(result, *culprits)


def test_checkpoint_from_another_config(debug_run, tmp_path):
    """Resume the session's debug checkpoint with a different model width."""
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    result = call_main("diffuse.train", "debug=default", "num_samples=0", f"ckpt_path={ckpt}", "model.d_model=32",
                       f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, str(ckpt), "another config")


@pytest.mark.parametrize("args,culprits", [
    (["ckpt=/no/such/file.ckpt"], ["ckpt=/no/such/file.ckpt"]),
    (["length=0"], ["length=0"]),
    (["steps=0", "sampler=remask"], ["sampler.steps=0"]),
])
def test_bad_sampling_input_is_a_one_line_error(args, culprits, debug_run, tmp_path):
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    result = call_main("diffuse.sample", f"ckpt={ckpt}", *args, "num_samples=1", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, *culprits)


def test_sampling_from_a_file_that_is_not_a_checkpoint(corpus, tmp_path):
    result = call_main("diffuse.sample", f"ckpt={corpus}", "num_samples=1", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, f"ckpt={corpus}", "not a readable checkpoint")
