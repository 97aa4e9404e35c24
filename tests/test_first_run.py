"""What `make train` (the default preset) prints at the end — a progress line per phase, the
samples, how they read (diffuse/evaluation/readable.py), val/bpt, the run dir and three next commands."""

from __future__ import annotations

import re

from conftest import run_cli

from diffuse.evaluation import readable


def test_word_metrics_on_given_text():
    vocab = readable.corpus_words(["The for statement is used to iterate\n\nover the elements of a sequence."])
    m = readable.word_metrics(["the for statement is used", "the the the the sequence. zzz"], vocab)
    assert m["words"] == 11
    assert m["in_corpus"] == 10 / 11  # "zzz" is not in the corpus; "sequence." is, with its full stop
    assert m["max_repeat"] == 4
    # bigrams: 4 distinct in the first; (the,the)×3, (the,sequence.), (sequence.,zzz) in the second: 7 of 9
    assert m["distinct_2"] == 7 / 9
    assert readable.longest_run([]) == 0 and readable.word_metrics([], vocab)["in_corpus"] == 0.0


def test_matched_entropy_compares_equal_lengths_and_flags_degenerate_samples():
    real = list(range(100))  # all distinct: log2(n) bits for any piece of n tokens
    ours, ref = readable.matched_entropy([[1, 1, 1, 1], [1, 2, 3, 4, 5, 6, 7, 8]], real)
    assert ours == (0.0 + 3.0) / 2 and ref == (2.0 + 3.0) / 2
    m = {"in_corpus": 1.0, "distinct_2": 1.0, "max_repeat": 1, "entropy": ours, "real_entropy": ref}
    assert not readable.meets_targets(m)  # reads fine, but less diverse than real text: degenerate
    assert readable.meets_targets({**m, "entropy": ref})
    assert not readable.meets_targets({**m, "entropy": ref, "max_repeat": 4})


def printed_samples(stdout: str) -> list[str]:
    lines, samples, current = stdout.splitlines(), [], None
    for line in lines:
        if re.fullmatch(r"--- sample \d+ \(\d+ tokens, \d+ forward passes\) ---", line):
            current = []
            samples.append(current)
        elif line == "---":
            current = None
        elif current is not None:
            current.append(line)
    return ["\n".join(s) for s in samples]


def test_default_preset_scaled_down_prints_phases_samples_metrics_and_next_steps(tmp_path):
    """The default preset (masked diffusion, BPE on the embedded corpus, its own sampler) in a few steps."""
    run_dir = tmp_path / "run"
    proc = run_cli("diffuse.train", "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
                   "model=transformer_tiny", "data.seq_len=32", "sample_length=24", "num_samples=3",
                   "~callbacks.progress_bar", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for phase in ("[1/3] tokenize", "[2/3] train: 6 steps", "[3/3] sample: 3 × 24 tokens, sampler=ancestral"):
        assert phase in proc.stderr + out, phase
    samples = printed_samples(out)
    assert len(samples) == 3

    # the printed figures are those of the printed samples, against the training text's words
    from diffuse.run.build import build_datamodule
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    dm = build_datamodule(cfg, seed=cfg.seed, cache_dir=cfg.paths.cache_dir)
    dm.load()
    m = readable.word_metrics(samples, readable.corpus_words(dm.raw["train"]["text"]))
    line = next(l for l in out.splitlines() if l.startswith("samples: "))
    shown = re.search(r"(\d+)% of (\d+) words .* distinct-2 ([\d.]+), longest repeat (\d+); unigram entropy "
                      r"([\d.]+) bits \(real text of the same lengths: ([\d.]+)\)", line)
    assert shown, line
    assert int(shown[1]) == round(100 * m["in_corpus"]) and int(shown[2]) == m["words"]
    assert float(shown[3]) == round(m["distinct_2"], 2) and int(shown[4]) == m["max_repeat"]
    # the default sampler is honest: ancestral at temperature 1 is not less diverse than real text
    assert float(shown[5]) >= float(shown[6])
    assert m["max_repeat"] <= readable.TARGETS["max_repeat"] and m["distinct_2"] >= readable.TARGETS["distinct_2"]

    assert re.search(r"^val/bpt: \d+\.\d+ ", out, re.M)
    assert f"run dir: {run_dir}" in out
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert f'python -m diffuse.sample ckpt={ckpt} prompt="The for statement"' in out
    assert f"python -m diffuse.evaluate ckpt={ckpt}" in out
    assert "python -m diffuse.train recipe=tdlm" in out


def test_samples_printed_after_training_past_the_context_are_warned_about(corpus, tmp_path):
    from conftest import call_main, tiny_args

    args = [a for a in tiny_args(corpus, tmp_path) if not a.startswith("num_samples")]
    result = call_main("diffuse.train", *args, "trainer.max_steps=1", "num_samples=1", "sample_length=40")
    assert result.returncode == 0, result
    assert "past the 32 the model was trained on (data.seq_len)" in result.stderr + result.stdout
