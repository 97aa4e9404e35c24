"""lm-evaluation-harness on diffuse checkpoints (issue 28): the Monte-Carlo estimator against the ELBO and the
log-likelihood enumerated on a tiny model, scores independent of batch size and reproducible, the exact AR score
equal to the bound diffuse.evaluate reports, and `python -m diffuse.lm_eval` on offline local tasks."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import SPECIAL, call_main, error_lines, tiny_transformer
from evaluation_runs import ckpt, corpus

from diffuse.evaluation.continuations import ExactScorer, MonteCarloScorer
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.hybrid import Hybrid
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.schedules import build_schedule

CONTEXT, CONTINUATION = [SPECIAL.bos, 3, 5, 7], [1, 2, 4]


@pytest.fixture(scope="module")
def peaked():
    """A random tiny transformer with its weights scaled up: sharp predictions that depend on each other, so the
    ELBO sits visibly below log p."""
    backbone = tiny_transformer(d_model=16, n_layers=1)
    with torch.no_grad():
        for p in backbone.parameters():
            p.mul_(4.0)
    return backbone, MaskedDiscrete(build_schedule("linear"), SPECIAL)


@torch.no_grad()
def subs_log_probs(backbone, objective, z: list[int]) -> torch.Tensor:
    ids = torch.tensor([z])
    hidden = objective.hidden(backbone, ids, torch.ones(1, 1), {"input_ids": ids, "segment_ids": torch.ones_like(ids)})
    return objective.log_probs(backbone.logits(hidden).double(), ids)[0]


def masked_row(masked) -> list[int]:
    return CONTEXT + [SPECIAL.mask if i in masked else c for i, c in enumerate(CONTINUATION)]


def test_monte_carlo_estimate_converges_to_the_enumerated_elbo_below_log_p(peaked):
    backbone, objective = peaked
    k, start = len(CONTINUATION), len(CONTEXT)
    # the ELBO by mask count: E_m~U{1..k} E_|S|=m [(k/m) Σ_{j∈S} log p(c_j | x, c with S masked)]
    elbo = 0.0
    for m in range(1, k + 1):
        subsets = list(itertools.combinations(range(k), m))
        for subset in subsets:
            logp = subs_log_probs(backbone, objective, masked_row(subset))
            elbo += sum(float(logp[start + j, CONTINUATION[j]]) for j in subset) * (k / m) / len(subsets) / k
    # log p of the model's generative process (reveal one token at a time in a uniformly random order), and the
    # same ELBO as E_order Σ log p (the any-order form): Jensen puts it below log p
    products, order_elbo = [], 0.0
    for order in itertools.permutations(range(k)):
        revealed, total = set(), 0.0
        for j in order:
            total += float(subs_log_probs(backbone, objective, masked_row(set(range(k)) - revealed))[start + j,
                                                                                                   CONTINUATION[j]])
            revealed.add(j)
        products.append(math.exp(total))
        order_elbo += total / math.factorial(k)
    log_p = math.log(sum(products) / len(products))
    assert order_elbo == pytest.approx(elbo, abs=1e-9)
    assert elbo < log_p - 0.1  # visibly apart: a test that confused the two would fail

    score = MonteCarloScorer(backbone, objective, batch_size=512, mc_samples=2048, seed=0).score([(CONTEXT, CONTINUATION)])[0]
    assert 0 < score.stderr < 0.05
    assert abs(score.logprob - elbo) < 4 * score.stderr  # unbiased for the ELBO (a wrong k/m weighting is far off)
    assert abs(score.logprob - log_p) > 4 * score.stderr


def test_scores_depend_neither_on_batch_size_nor_on_order_and_reruns_repeat(peaked):
    backbone, objective = peaked
    requests = [(CONTEXT, CONTINUATION), (CONTEXT[:2], CONTINUATION + [9, 11]), ([SPECIAL.bos], [6])]

    def scores(batch_size, reqs=requests, seed=0):
        return [s.logprob for s in MonteCarloScorer(backbone, objective, batch_size, 16, seed).score(reqs)]

    first = scores(5)
    # equal up to float32 rounding (other batches are other padding widths: other summation orders)
    assert scores(64) == pytest.approx(first, abs=1e-5)
    assert scores(1) == pytest.approx(first, abs=1e-5)
    assert scores(7, requests[::-1]) == pytest.approx(first[::-1], abs=1e-5)
    assert scores(5) == first  # a rerun: the same numbers
    assert scores(5, seed=1) != first


def test_exact_score_is_the_nll_the_objective_reports_for_ar_and_the_hybrid_clean_row():
    tokens = [4, 8, 15, 16, 23, 2, 30]
    ids = torch.tensor([[SPECIAL.bos] + tokens])
    for objective in (Autoregressive(SPECIAL), Hybrid(build_schedule("linear"), SPECIAL, block_size=4)):
        backbone = tiny_transformer(seed=1)
        with torch.no_grad():
            nll = float(objective.loss(backbone, {"input_ids": ids, "segment_ids": torch.ones_like(ids)}, train=False).nll_sum)
        scorer = ExactScorer(backbone, SPECIAL, batch_size=2)
        whole, split = scorer.score([([SPECIAL.bos], tokens), ([SPECIAL.bos] + tokens[:3], tokens[3:])])
        head = scorer.score([([SPECIAL.bos], tokens[:3])])[0]
        assert whole.logprob == pytest.approx(-nll, abs=1e-4)
        assert head.logprob + split.logprob == pytest.approx(whole.logprob, abs=1e-5)  # the chain rule


def local_tasks(tmp_path):
    from diffuse.evaluation.local_tasks import write_local_tasks

    return write_local_tasks(corpus(), tmp_path / "tasks", docs=8)


@pytest.mark.parametrize("objective", ["autoregressive", "masked_discrete"])
def test_lm_eval_command_writes_lm_evals_results_and_the_estimator_choices(tmp_path, objective):
    run_dir = tmp_path / "run"
    # the tasks from a folder written beforehand, or written by the command from a text file
    tasks = f"task_dir={local_tasks(tmp_path)}" if objective == "autoregressive" else f"local_tasks={corpus()}"
    result = call_main("diffuse.lm_eval", f"ckpt={ckpt(objective)}", "tasks=[diffuse_cloze,diffuse_continue,diffuse_text]",
                       tasks, "builtin_tasks=false", "limit=4", "mc_samples=8", "steps=4", "device=cpu",
                       f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["results"]) == {"diffuse_cloze", "diffuse_continue", "diffuse_text"}
    assert 0 <= results["results"]["diffuse_cloze"]["acc,none"] <= 1
    assert results["results"]["diffuse_text"]["bits_per_byte,none"] > 0
    choices = results["diffuse"]
    expected = "exact" if objective == "autoregressive" else "monte_carlo"
    assert choices["loglikelihood"]["estimator"].startswith(expected)
    assert choices["generate_until"]["samplers_used"][0]["temperature"] == 0.0  # the task does not sample
    table = (run_dir / "lm_eval.md").read_text()
    assert "diffuse_cloze" in table and "Estimator choices" in table and (run_dir / ".hydra").is_dir()


def test_the_model_is_registered_in_lm_evals_registry():
    from lm_eval.api.registry import get_model

    from diffuse.evaluation.lm_eval_model import DiffuseLM

    assert get_model("diffuse") is DiffuseLM


def test_bad_input_is_one_line(tmp_path):
    tasks = local_tasks(tmp_path)
    common = (f"task_dir={tasks}", "builtin_tasks=false", f"hydra.run.dir={tmp_path / 'run'}")
    unknown = call_main("diffuse.lm_eval", f"ckpt={ckpt('autoregressive')}", "tasks=diffuse_clozee", *common)
    assert unknown.returncode == 2 and error_lines(unknown.stderr) == [
        "error: tasks: diffuse_clozee is not a task lm-eval knows (did you mean diffuse_cloze?) among task_dir's (builtin_tasks=false)"]
    odd = call_main("diffuse.lm_eval", f"ckpt={ckpt('autoregressive')}", "tasks=diffuse_cloze", "mc_samples=3", *common)
    assert odd.returncode == 2 and "mc_samples=3 must be an even integer" in error_lines(odd.stderr)[0]
    maybe = call_main("diffuse.lm_eval", f"ckpt={ckpt('autoregressive')}", "tasks=diffuse_cloze", *common,
                      "builtin_tasks=maybe")  # the last value given wins
    assert error_lines(maybe.stderr) == ["error: builtin_tasks=maybe must be true or false"], maybe


def test_block_diffusion_estimate_is_the_sum_of_each_blocks_enumerated_elbo(peaked):
    """objective.block_size=2: the continuation at positions 4, 5 | 6 spans two blocks; each block's bound is taken
    given the clean blocks before it (the scorer draws each block's own mask count, weight k_b/m_b)."""
    backbone, _ = peaked
    objective = MaskedDiscrete(build_schedule("linear"), SPECIAL, block_size=2)
    clean = torch.tensor([CONTEXT + CONTINUATION])
    elbo, start = 0.0, len(CONTEXT)
    for block in ([start, start + 1], [start + 2]):
        k = len(block)
        for m in range(1, k + 1):
            subsets = list(itertools.combinations(block, m))
            for subset in subsets:
                z = clean.clone()
                z[0, list(subset)] = SPECIAL.mask
                with torch.no_grad():
                    hidden = objective.hidden(backbone, z, torch.ones(1, 1),
                                              {"input_ids": clean, "segment_ids": torch.ones_like(clean)})
                    logp = objective.log_probs(backbone.logits(hidden).double(), z)[0]
                elbo += sum(float(logp[j, clean[0, j]]) for j in subset) * (k / m) / len(subsets) / k
    score = MonteCarloScorer(backbone, objective, batch_size=512, mc_samples=1024, seed=0).score([(CONTEXT, CONTINUATION)])[0]
    assert abs(score.logprob - elbo) < 4 * score.stderr + 1e-6
    assert score.stderr < 0.1


def test_an_ar_checkpoint_scores_as_lm_evals_own_hf_model_does_on_its_llama_export(tmp_path):
    """The AR checkpoint exported format=llama, scored by lm-eval's `hf` model, against the `diffuse` model on the same
    local task: equal loglikelihoods (1e-4), greedy flags and accuracies. The export's head keeps the [MASK] row, so
    its softmax runs over V + [MASK] while the AR model (its loss, val/nelbo, our exact score) runs over V: compared
    under the same softmax, and the default score is the higher one (one more token in the normalizer)."""
    from dataclasses import replace

    import lm_eval
    from lm_eval.tasks import TaskManager

    from diffuse.evaluation.lm_eval_model import DiffuseLM

    folder = tmp_path / "llama"
    assert call_main("diffuse.export", f"ckpt={ckpt('autoregressive')}", f"out={folder}", "format=llama").returncode == 0
    manager = TaskManager(include_path=str(local_tasks(tmp_path)), include_defaults=False)

    def evaluate(model, model_args=None):
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["diffuse_cloze"], task_manager=manager,
                                      limit=8, log_samples=True)
        return out["results"]["diffuse_cloze"], [r[0] for s in out["samples"]["diffuse_cloze"] for r in s["resps"]]

    hf, hf_scores = evaluate("hf", f"pretrained={folder},dtype=float32,device=cpu")
    ours = DiffuseLM(ckpt=ckpt("autoregressive"), device="cpu", batch_size=3)
    default = [float(s[0]) for s in evaluate(ours)[1]]
    ours.scorer = ExactScorer(ours.module.backbone, replace(ours.special, mask=None), batch_size=3)
    mine, mine_scores = evaluate(ours)
    assert len(hf_scores) == len(mine_scores) == 32  # 8 documents × 4 choices
    assert [float(s[0]) for s in mine_scores] == pytest.approx([float(s[0]) for s in hf_scores], abs=1e-4)
    assert [bool(s[1]) for s in mine_scores] == [bool(s[1]) for s in hf_scores]
    assert (mine["acc,none"], mine["acc_norm,none"]) == (hf["acc,none"], hf["acc_norm,none"])
    assert all(d >= float(h[0]) - 1e-6 for d, h in zip(default, hf_scores))


def test_generation_is_the_same_in_any_batch_and_cut_at_the_stop_strings():
    """The masked checkpoint's own sampler at temperature 1 (random draws): each request gets seed + its index, so
    batches of 1 and of 4 give the same texts; `until` cuts after generation; a long context keeps room to generate."""
    from lm_eval.api.instance import Instance

    from diffuse.evaluation.lm_eval_model import DiffuseLM

    kwargs = {"until": ["t"], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
    contexts = ["the cat sat", "a small", "we walk by the river at noon. the dog ran to the old tree. a small", ""]
    requests = [Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)]
    texts = {}
    for batch_size in (1, 4):
        lm = DiffuseLM(ckpt=ckpt("masked_discrete"), device="cpu", batch_size=batch_size, steps=4)
        texts[batch_size] = lm.generate_until(requests)
    assert texts[1] == texts[4] and len(texts[1]) == 4
    uncut = lm.generate_until([Instance("generate_until", {}, (c, {**kwargs, "until": []}), i)
                               for i, c in enumerate(contexts)])
    assert any("t" in text for text in uncut)
    assert texts[1] == [text.split("t")[0] for text in uncut]
    assert lm.choices["generate_until"]["lengths"] == [12]  # the long context was cut to leave room for 12 tokens


def test_guidance_masks_the_context_for_its_unconditional_pass(peaked):
    """cfg_scale w: logits u + (1 + w)(c − u), u with the context after BOS masked. With no context after BOS the two
    passes are one (the score is unguided); with a context it moves."""
    backbone, objective = peaked

    def score(requests, w):
        return [s.logprob for s in MonteCarloScorer(backbone, objective, 32, 8, 0, cfg_scale=w).score(requests)]

    bare = [([SPECIAL.bos], CONTINUATION)]
    assert score(bare, 2.0) == pytest.approx(score(bare, 0.0), abs=1e-5)
    assert abs(score([(CONTEXT, CONTINUATION)], 2.0)[0] - score([(CONTEXT, CONTINUATION)], 0.0)[0]) > 0.01


def test_rolling_loglikelihood_of_an_ar_model_is_its_exact_loglikelihood_after_bos():
    """loglikelihood_rolling goes through diffuse.evaluate's bound (evaluation/likelihood.py); for an AR model that is
    the exact NLL, so it equals loglikelihood of the text after an empty context (BOS) — and a text longer than the
    rows is scored in windows."""
    from lm_eval.api.instance import Instance

    from diffuse.evaluation.lm_eval_model import DiffuseLM

    lm = DiffuseLM(ckpt=ckpt("autoregressive"), device="cpu")
    text = "the cat sat on the mat."
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    exact = lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])[0][0]
    assert rolling == pytest.approx(exact, abs=1e-4)
    long = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text * 3,), 0)])[0]
    assert long < 2 * rolling < 0  # 69 bytes in windows of 31 after BOS: about three times the cost of 23 bytes


def test_a_self_conditioned_model_is_scored_by_its_two_pass_network():
    """As val/nelbo and the samplers: the second pass reads the first's prediction (a one-pass score read zeros)."""
    backbone = tiny_transformer(seed=2, self_condition=True)
    with torch.no_grad():
        backbone.self_cond.mlp.down.weight.normal_(0, 0.5)  # a fresh model's term is zero: make it count
    objective = MaskedDiscrete(build_schedule("linear"), SPECIAL)
    c = CONTINUATION[0]
    got = MonteCarloScorer(backbone, objective, 8, 2, 0).score([(CONTEXT, [c])])[0].logprob  # one token: exact
    z, clean = torch.tensor([CONTEXT + [SPECIAL.mask]]), torch.tensor([CONTEXT + [c]])
    batch = {"input_ids": clean, "segment_ids": torch.ones_like(z)}
    with torch.no_grad():
        h = objective.conditioned_hidden(backbone, z, torch.ones(1, 1), batch, train=False)
    two = float(objective.log_probs(backbone.logits(h).double(), z)[0, -1, c])
    one = float(subs_log_probs(backbone, objective, CONTEXT + [SPECIAL.mask])[-1, c])
    assert got == pytest.approx(two, abs=1e-6) and abs(two - one) > 1e-3
