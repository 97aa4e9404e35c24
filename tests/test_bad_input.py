"""Bad input: each is a one-line error naming the culprit, a non-zero exit code, no traceback.

Two cases run as real processes (`python -m …`); the rest call the same Hydra entry point
in-process (argv → compose → run → one-line error → exit code), which costs ~1 s instead of ~8 s.
"""

from __future__ import annotations

import json
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
    not_text = tmp_path / "not_text"  # a folder holding only a config file and a hidden notebook copy
    (not_text / ".ipynb_checkpoints").mkdir(parents=True)
    (not_text / "conf.json").write_text('{"lr": 0.001}\n')
    (not_text / ".ipynb_checkpoints" / "notes-checkpoint.txt").write_text("a hidden copy\n")
    return {"missing": tmp_path / "nope.txt", "empty": empty, "latin1": latin1, "not_text": not_text}


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
    "negative lr": (lambda c, f: ["optim.lr=-1"], ["optim.lr=-1", "> 0"]),
    "negative warmup": (lambda c, f: ["optim.warmup_steps=-5"], ["optim.warmup_steps=-5"]),
    "betas out of range": (lambda c, f: ["optim.betas=[0.9,1.5]"], ["optim.betas="]),
    "folder as ckpt_path": (lambda c, f: [f"ckpt_path={f['missing'].parent}"], ["ckpt_path=", "is a folder"]),
    "folder without text": (lambda c, f: [f"data.path={f['not_text']}"], ["not_text", "no text files", "conf.json"]),
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


def test_resuming_with_another_objective(debug_run, tmp_path):
    """A masked checkpoint has the same tensors as an autoregressive one: the weights fit, the run does not."""
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    result = call_main("diffuse.train", "debug=default", "num_samples=0", f"ckpt_path={ckpt}", "objective=autoregressive",
                       f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, str(ckpt), "objective=masked_discrete", "objective=autoregressive")
    assert not (tmp_path / "checkpoints").exists()


LONG_PROMPT = " ".join(str(i) for i in range(40))  # ≥ 40 tokens: past the debug checkpoint's data.seq_len=32


@pytest.mark.parametrize("args,culprits", [
    (["ckpt=/no/such/file.ckpt"], ["ckpt=/no/such/file.ckpt"]),
    (["length=0"], ["length=0"]),
    (["device=tpu"], ["device=tpu"]),
    (["steps=0", "sampler=remask"], ["sampler.steps=0"]),
    (["temperature=-1"], ["sampler.temperature=-1"]),
    (["temperature=-1", "sampler=ancestral"], ["sampler.temperature=-1"]),
    (["length=500"], ["length=500", "data.seq_len=32", "+beyond_context=true"]),
    ([f"prompt='{LONG_PROMPT}'", "length=8"], ["prompt", "length=8", "data.seq_len=32"]),
])
def test_bad_sampling_input_is_a_one_line_error(args, culprits, debug_run, tmp_path):
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    result = call_main("diffuse.sample", f"ckpt={ckpt}", *args, "num_samples=1", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, *culprits)


def test_sampling_past_the_trained_context_on_request(debug_run, tmp_path, monkeypatch):
    import diffuse.run.entry

    warned = []
    monkeypatch.setattr(diffuse.run.entry.log, "warning", lambda msg, *a: warned.append(msg % a))
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    result = call_main("diffuse.sample", f"ckpt={ckpt}", "num_samples=1", "length=40", "steps=4", "+beyond_context=true",
                       f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0 and not error_lines(result.stderr), result
    assert len(warned) == 1 and "41 positions" in warned[0] and "quality unknown" in warned[0], warned


def test_a_folder_given_as_ckpt(debug_run, tmp_path):
    result = call_main("diffuse.sample", f"ckpt={debug_run / 'checkpoints'}", "num_samples=1", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, f"ckpt={debug_run / 'checkpoints'}", "is a folder", "last.ckpt")


def test_ar_sampler_top_k_must_be_positive():
    from diffuse.errors import DiffuseError
    from diffuse.sampling.ar import ARSampler

    with pytest.raises(DiffuseError, match="sampler.top_k=0"):
        ARSampler(top_k=0)
    with pytest.raises(DiffuseError, match="sampler.temperature=-0.5"):
        ARSampler(temperature=-0.5)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD_PAIRS = [{"prompt": f"Q{i}? ", "completion": f"A{i}."} for i in range(30)]
GOOD_CHATS = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
              for i in range(30)]
SFT_CASES = {
    # name: (the bad row, inserted as row 11, culprits the message must name)
    "missing prompt": ({"completion": "x"}, GOOD_PAIRS, ["row 11", "no 'prompt'"]),
    "missing completion": ({"prompt": "x"}, GOOD_PAIRS, ["row 11", "no 'completion'"]),
    "non-string completion": ({"prompt": "x", "completion": 5}, GOOD_PAIRS, ["row 11", "completion=5", "int"]),
    "message without content": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, GOOD_CHATS,
                                ["row 11", "message 1", "no 'content'"]),
    "answer without content": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, GOOD_CHATS,
                               ["row 11", "message 2", "no 'content'"]),
}


@pytest.mark.parametrize("case", SFT_CASES)
def test_bad_sft_rows_are_a_one_line_error(case, tmp_path):
    bad, good, culprits = SFT_CASES[case]
    data = _jsonl(tmp_path / "train.jsonl", good[:10] + [bad] + good[10:])
    result = call_main("diffuse.train", "debug=default", "data=sft", f"data.path={data}", "tokenizer=byte",
                       "num_samples=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(result, "train.jsonl", *culprits)


def test_sampling_from_a_file_that_is_not_a_checkpoint(corpus, tmp_path):
    result = call_main("diffuse.sample", f"ckpt={corpus}", "num_samples=1", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, f"ckpt={corpus}", "not a readable checkpoint")


def test_evaluate_refuses_a_length_past_the_trained_context_and_compare_names_its_key(debug_run, tmp_path):
    ckpt = debug_run / "checkpoints" / "last.ckpt"
    result = call_main("diffuse.evaluate", f"ckpt={ckpt}", "length=500", "likelihood=false", "progress=false",
                       f"hydra.run.dir={tmp_path / 'eval'}")
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "length=500" in lines[0] and "seq_len" in lines[0], result
    result = call_main("diffuse.compare", f"a={ckpt}", f"b={tmp_path}", f"hydra.run.dir={tmp_path / 'cmp'}")
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: b={tmp_path} is a folder"), result
