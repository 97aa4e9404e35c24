"""diffuse.evaluate: diversity statistics, judges, the likelihood bound with its standard errors, and
the CLI on every objective."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import call_main, error_lines
from diffuse.errors import DiffuseError
from diffuse.evaluation.judges import DiffuseJudge, HFJudge, perplexity
from diffuse.evaluation.likelihood import evaluate_likelihood
from diffuse.evaluation.quality import degenerate, generate, real_snippets
from diffuse.evaluation.runner import eval_data_config, heldout, load_checkpoint
from diffuse.evaluation.text_stats import distinct_n, diversity, unigram_entropy
from diffuse.registry import OBJECTIVES
from diffuse.sampling.base import SampleOutput
from evaluation_runs import ckpt, corpus, tiny_run

EVALUABLE = [o for o in ("masked_discrete", "autoregressive", "llada", "continuous") if o in OBJECTIVES]
QUICK = ("num_samples=2", "length=8", "limit_batches=1", "t_samples=2", "reference_samples=4", "progress=false")


# -- diversity --------------------------------------------------------------------------------------
def test_entropy_of_a_constant_sequence_is_zero_and_of_distinct_tokens_is_log2_n():
    assert unigram_entropy([7] * 50) == 0.0
    assert unigram_entropy([]) == 0.0
    assert unigram_entropy(list("abcdefgh")) == pytest.approx(3.0)
    assert unigram_entropy(list("aab")) == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))


def test_distinct_n_on_known_strings():
    words = "a b a b".split()
    assert distinct_n([words], 1) == pytest.approx(2 / 4)
    assert distinct_n([words], 2) == pytest.approx(2 / 3)  # (a b) (b a) (a b)
    assert distinct_n([words], 3) == pytest.approx(2 / 2)
    # n-grams never cross samples: "x y" + "z" has bigram (x, y) only
    assert distinct_n(["xy", "z"], 2) == 1.0 and distinct_n(["xy", "xy"], 2) == 0.5
    assert distinct_n([[], [1]], 2) == 0.0
    stats = diversity([[1, 1, 1, 1], [1, 2, 3, 4]])
    assert stats["entropy"] == pytest.approx((0.0 + 2.0) / 2)
    assert stats["distinct_1"] == pytest.approx(4 / 8)


def test_degenerate_means_better_than_real_text_at_lower_entropy():
    ref = {"judge_ppl": 20.0, "entropy": 4.0}
    assert degenerate({"gen_ppl": 5.0, "entropy": 1.0}, ref) is True
    assert degenerate({"gen_ppl": 5.0, "entropy": 4.5}, ref) is False
    assert degenerate({"gen_ppl": 30.0, "entropy": 1.0}, ref) is False
    assert degenerate({"gen_ppl": None, "entropy": 1.0}, ref) is None


# -- judges -----------------------------------------------------------------------------------------
def real_and_shuffled(tokenizer, n: int = 12, length: int = 24):
    texts, pieces = real_snippets(corpus().read_text().split("\n\n")[-40:], tokenizer, n, length)
    rng = random.Random(0)
    shuffled = []
    for p in pieces:
        p = list(p)
        rng.shuffle(p)
        shuffled.append(tokenizer.decode(p, skip_special_tokens=True))
    return texts, shuffled


def test_samples_report_the_cost_of_a_sample_alone_beside_the_batch_nfe():
    class Batches(torch.nn.Module):  # row r of every batch finishes after r + 1 passes; the batch after 10
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, prompts, length, seed=0, sampler=None):
            n = len(prompts)
            return SampleOutput(torch.full((n, length), 7), torch.full((n,), length), 10, prompts, torch.arange(n) + 1)

    class Tokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    samples = generate(Batches(), None, Tokenizer(), num_samples=5, length=4, batch_size=3, seed=0)
    assert samples.nfe == 10 and samples.nfe_per_sample == pytest.approx((1 + 2 + 3 + 1 + 2) / 5)


def test_the_datas_own_ar_model_scores_real_text_better_than_shuffled_tokens():
    judge_ckpt = load_checkpoint(ckpt("autoregressive"), "cpu")
    judge = DiffuseJudge(judge_ckpt.module, judge_ckpt.tokenizer, "ar")
    real, shuffled = real_and_shuffled(judge_ckpt.tokenizer)
    assert len(real) == 12
    ppl_real, ppl_shuffled = perplexity(judge.score(real))["ppl"], perplexity(judge.score(shuffled))["ppl"]
    assert ppl_real < 0.8 * ppl_shuffled, (ppl_real, ppl_shuffled)  # same unigrams: only order differs


def test_a_judge_must_be_autoregressive():
    masked = load_checkpoint(ckpt("masked_discrete"), "cpu")
    with pytest.raises(DiffuseError, match="must be autoregressive"):
        DiffuseJudge(masked.module, masked.tokenizer, "masked")


def test_hf_judge_from_a_local_folder_and_a_one_line_error_offline(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_checkpoint(ckpt("autoregressive"), "cpu").tokenizer
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = HFJudge(str(tmp_path), torch.device("cpu"))
    scores = judge.score(["the cat sat", ""])
    n = len(tok("the cat sat", add_special_tokens=False)["input_ids"])
    assert scores[0].tokens == n and math.isfinite(scores[0].nll) and scores[0].nll > 0  # BOS prefixed
    assert scores[1].tokens == 0
    with pytest.raises(DiffuseError, match="judge_model='no-such-org/no-such-model'"):
        HFJudge("no-such-org/no-such-model", torch.device("cpu"))


# -- likelihood -------------------------------------------------------------------------------------
def batches_of(run):
    c = load_checkpoint(str(run / "checkpoints" / "last.ckpt"), "cpu")
    dm = heldout(c, dict(c.cfg.data), int(c.cfg.seed), str(run / "cache"))
    return c, list(dm.val_dataloader())[:2]  # debug=default validates on 2 batches


@pytest.mark.parametrize("objective", ["masked_discrete", "autoregressive"])
def test_one_t_sample_reproduces_trainings_val_nelbo(objective):
    run = tiny_run(objective)
    c, batches = batches_of(run)
    trained = json.loads((run / "metrics.json").read_text())["val/nelbo"]
    got = evaluate_likelihood(c.module, batches, t_samples=1, seed=int(c.cfg.seed))
    assert got["val/nelbo"] == pytest.approx(trained, rel=1e-5)
    assert got["val/bpt"] == pytest.approx(got["val/nelbo"] / math.log(2))
    assert got["val/ppl"] == pytest.approx(math.exp(got["val/nelbo"]))


def test_t_samples_average_independent_draws_and_report_their_noise():
    c, batches = batches_of(tiny_run("masked_discrete"))
    one = evaluate_likelihood(c.module, batches, t_samples=1, seed=0)
    three = evaluate_likelihood(c.module, batches, t_samples=3, seed=0)
    assert three["t_samples"] == 3 and three["val/tokens"] == one["val/tokens"]
    assert three["val/nelbo"] != one["val/nelbo"]  # more draws, a different (averaged) estimate
    assert three["val/nelbo_t_stderr"] > 0 and three["val/nelbo_stderr"] > 0
    assert one["val/nelbo_t_stderr"] is None  # one draw cannot estimate its own noise
    assert {"val/accuracy_low", "val/accuracy_mid", "val/accuracy_high"} & set(three)


def test_autoregressive_nll_is_exact_so_t_samples_do_not_apply():
    c, batches = batches_of(tiny_run("autoregressive"))
    got = evaluate_likelihood(c.module, batches, t_samples=5, seed=0)
    again = evaluate_likelihood(c.module, batches, t_samples=1, seed=123)
    assert got["t_samples"] == 1 and got["val/nelbo_t_stderr"] == 0.0
    assert got["val/nelbo"] == pytest.approx(again["val/nelbo"], rel=1e-9)


def test_data_module_keys_follow_the_checkpoint_unless_given_on_the_command_line():
    train = {"name": "embedded", "seq_len": 32, "eval_batch_size": 8, "add_bos": True}
    given = {"name": "text", "path": "x.txt", "seq_len": 128, "eval_batch_size": 32}
    assert eval_data_config(train, None) == train
    assert eval_data_config(train, given) == {"name": "text", "path": "x.txt", "seq_len": 32, "eval_batch_size": 8,
                                              "add_bos": True}
    assert eval_data_config(train, given, {"seq_len"})["seq_len"] == 128


# -- the CLI ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", EVALUABLE)
def test_evaluate_cli_on_every_objective(objective, tmp_path):
    result = call_main("diffuse.evaluate", f"ckpt={ckpt(objective)}", f"judge={ckpt('autoregressive')}",
                       f"hydra.run.dir={tmp_path}", *QUICK)
    assert result.returncode == 0, result
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["objective"] == objective
    lk = report["likelihood"]
    assert math.isfinite(lk["val/bpt"]) and lk["val/tokens"] > 0
    assert lk["t_samples"] == (1 if objective == "autoregressive" else 2)
    point = report["quality"]
    assert point["gen_ppl"] > 1 and 0 <= point["entropy"] and point["nfe"] > 0 and point["seconds_per_sample"] > 0
    assert report["reference"]["judge_ppl"] > 1 and len(report["samples"]) == 2
    assert "val/bpt" in result.stdout and "gen-PPL" in result.stdout  # what is printed is what is saved


def test_evaluate_cli_sweeps_steps_on_other_data_and_skips_gen_ppl_without_a_judge(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"line {i} of some other text, not the training corpus." for i in range(60)))
    result = call_main("diffuse.evaluate", f"ckpt={ckpt('masked_discrete')}", "data=text", f"data.path={other}",
                       "steps=[2,4]", f"hydra.run.dir={tmp_path / 'out'}", *QUICK)
    assert result.returncode == 0, result
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["data"]["path"] == str(other) and report["data"]["seq_len"] == 32  # the checkpoint's context
    assert [p["steps"] for p in report["sweep"]] == [2, 4]
    assert all(p["gen_ppl"] is None for p in report["sweep"]) and report["judge"] is None
    assert any("gen-PPL skipped" in n for n in report["notes"])
    sweep = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert len(sweep["points"]) == 2
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_cli_one_line_errors(tmp_path):
    bad = call_main("diffuse.evaluate", f"ckpt={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path}")
    assert bad.returncode == 2 and len(error_lines(bad.stderr)) == 1 and "missing.ckpt" in bad.stderr
    offline = call_main("diffuse.evaluate", f"ckpt={ckpt('masked_discrete')}", "judge=hf",
                        "judge_model=no-such-org/no-such-model", f"hydra.run.dir={tmp_path}", *QUICK)
    assert offline.returncode == 2 and error_lines(offline.stderr) == [
        line for line in offline.stderr.splitlines() if "judge_model='no-such-org/no-such-model'" in line]
    bad_t = call_main("diffuse.evaluate", f"ckpt={ckpt('masked_discrete')}", "t_samples=0", f"hydra.run.dir={tmp_path}")
    assert bad_t.returncode == 2 and error_lines(bad_t.stderr) == ["error: t_samples=0 must be an integer ≥ 1"]
