"""sampler=speculative (diffuse/sampling/speculative.py): exact speculative sampling.

(1) The rule alone: the first token it emits is distributed exactly as p — analytically and over 200k draws —
    and two deliberately wrong rules fail the same check.
(2) End to end on tiny transformers: greedy speculative tokens are the AR sampler's greedy tokens (AR, masked
    and block diffusion drafters; batch = singles with left padding); at temperature 1 (top_k=4) the empirical
    distribution of 20k length-3 continuations matches the enumerated AR distribution within its sampling
    error, and a wrong rule does not.
(3) The CLI: `python -m diffuse.sample ckpt=<AR> sampler=speculative sampler.drafter=<AR or masked ckpt>`.
(4) objective=hybrid drafting for itself (HybridDrafter, its default sampler): the draft block's distributions are
    the training layout's, greedy tokens are the AR sampler's on the same network, the temperature-1 distribution
    is AR's within its sampling error, drafting against the target's KV cache (1 + k positions) gives the uncached
    draft's q, and `python -m diffuse.sample ckpt=<hybrid>` (speculative by default) gives sampler=ar's tokens at
    temperature 0.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SPECIAL, VOCAB, call_main, error_lines, tiny_args, tiny_transformer
from omegaconf import OmegaConf
from scipy import stats

from diffuse.errors import DiffuseError
from diffuse.models.layers import BlockLayout
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.hybrid import Hybrid
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.run.build import build_sampler
from diffuse.run.entry import sampler_spec
from diffuse.run.load import load_run
from diffuse.sampling.ar import ARSampler
from diffuse.sampling.base import draw, trim_at_eos, truncate
from diffuse.sampling.drafters import ARDrafter, Drafter, HybridDrafter, MaskedDrafter
from diffuse.sampling.speculative import SpeculativeSampler, Warp, speculative_rule
from diffuse.schedules import build_schedule

AR_OBJ = Autoregressive(special=SPECIAL)


# -- (1) the rule alone -------------------------------------------------------------------------------------
def resample_from_p(p, q, drafts, u):
    """Wrong: at a rejection, draw from p instead of norm(max(0, p − q))."""
    n, _ = speculative_rule(p, q, drafts, u)
    B, k = drafts.shape
    at = n[:, None, None].expand(B, 1, p.shape[-1])
    return n, draw(p.gather(1, at)[:, 0], u[:, k])


def accept_with_p(p, q, drafts, u):
    """Wrong: accept d with probability p(d), without the ratio to q(d)."""
    B, k = drafts.shape
    pd = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    n = (u[:, :k] < pd).long().cumprod(1).sum(1)
    at = n[:, None, None].expand(B, 1, p.shape[-1])
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1).gather(1, at)[:, 0]
    p_next = p.gather(1, at)[:, 0]
    residual = (p_next - q_next).clamp_min(0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return n, draw(residual, u[:, k])


def first_token_exact(p1, q1, wrong=None):
    """The exact distribution of the first emitted token, from the rule written out: accepted draft x with
    q(x)·min(1, p(x)/q(x)); otherwise (probability β) the residual's draw."""
    if wrong == "accept_with_p":
        acc = q1 * p1
    else:
        acc = torch.minimum(q1, p1)
    beta = 1 - acc.sum()
    residual = p1 if wrong == "resample_from_p" else (p1 - q1).clamp_min(0)
    return acc + beta * residual / residual.sum()


def random_dists(V, k, seed):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(k + 1, V, generator=g, dtype=torch.float64) * 1.5).softmax(-1)
    q = (torch.randn(k, V, generator=g, dtype=torch.float64) * 1.5).softmax(-1)
    return p, q


def empirical_first_token(rule, p, q, n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, V = q.shape
    P, Q = p.expand(n, k + 1, V), q.expand(n, k, V)
    drafts = draw(Q, torch.rand(n, k, generator=g, dtype=p.dtype))
    accepted, nxt = rule(P, Q, drafts, torch.rand(n, k + 1, generator=g, dtype=p.dtype))
    first = torch.where(accepted > 0, drafts[:, 0], nxt)
    return torch.bincount(first, minlength=V).double() / n


def chi2_pvalue(freq, expected, n):
    obs, exp = freq * n, expected * n
    keep = exp > 5
    obs = torch.cat([obs[keep], obs[~keep].sum()[None]]) if (~keep).any() else obs
    exp = torch.cat([exp[keep], exp[~keep].sum()[None]]) if (~keep).any() else exp
    return stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_rule_emits_its_first_token_exactly_from_p(k, seed):
    p, q = random_dists(V=6, k=k, seed=seed)
    # analytically: the rule's formula gives p exactly; the wrong rules do not
    torch.testing.assert_close(first_token_exact(p[0], q[0]), p[0], rtol=0, atol=1e-12)
    for wrong in ("resample_from_p", "accept_with_p"):
        assert (first_token_exact(p[0], q[0], wrong) - p[0]).abs().sum() > 0.05
    # empirically (200k draws): the rule passes a chi-square test against p, the wrong rules fail it
    n = 200_000
    freq = empirical_first_token(speculative_rule, p, q, n, seed)
    assert chi2_pvalue(freq, p[0], n) > 1e-4
    assert (freq - p[0]).abs().sum() / 2 < 0.01
    for wrong in (resample_from_p, accept_with_p):
        bad = empirical_first_token(wrong, p, q, n, seed)
        assert chi2_pvalue(bad, p[0], n) < 1e-12, wrong.__name__


def test_the_rule_follows_the_bonus_and_greedy_cases():
    V = 5
    p = torch.zeros(2, 3, V)
    p[..., 2] = 1.0  # the target puts everything on token 2
    q = torch.zeros(2, 2, V)
    q[0, :, 2] = 1.0  # row 0's drafts agree: both accepted, then the bonus from p_3
    q[1, :, 4] = 1.0  # row 1's first draft disagrees: rejected, the residual is one-hot on 2
    drafts = torch.tensor([[2, 2], [4, 4]])
    n, nxt = speculative_rule(p, q, drafts, torch.rand(2, 3))
    assert n.tolist() == [2, 0] and nxt.tolist() == [2, 2]
    w = Warp(temperature=0.0)
    logits = torch.randn(3, V)
    assert (w(logits).argmax(-1) == logits.argmax(-1)).all() and (w(logits).sum(-1) == 1).all()
    # the AR sampler's order: truncate the log-probabilities, then divide by T
    w = Warp(temperature=0.7, top_k=2)
    torch.testing.assert_close(w(logits), (truncate(logits.log_softmax(-1), 2) / 0.7).softmax(-1))


def test_draw_never_picks_a_zero_weight_token():
    weights = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]]).expand(7, 5)
    u = torch.tensor([0.0, 1e-9, 0.3, 0.34, 0.5, 0.999999, 1.0 - 1e-12])
    assert draw(weights, u).tolist() == [1, 1, 1, 3, 3, 3, 3]


# -- (2) end to end on tiny transformers --------------------------------------------------------------------
def sharp_transformer(seed: int, scale: float = 30.0):
    """A tiny untrained AR transformer with peaked next-token distributions (entropy ≈ 1.5 nats): untrained
    logits are nearly uniform, which would make every drafter look right."""
    model = tiny_transformer(seed=seed, tie_weights=False)
    model.head.weight.data *= scale
    return model


def near_copy(model, seed: int, noise: float):
    """A drafter of another seed that agrees with `model` part of the time: its weights plus seeded noise."""
    other = tiny_transformer(seed=seed, tie_weights=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mine, theirs in zip(other.parameters(), model.parameters()):
            mine.copy_(theirs + noise * theirs.std() * torch.randn(theirs.shape, generator=g))
    return other


PROMPTS = [[1, 2, 3], [5], [], [7, 8, 9, 10, 11, 12], [4, 4]]


def masked_drafter(block_size=None):
    objective = MaskedDiscrete(schedule=build_schedule("linear"), special=SPECIAL,
                               **({"block_size": block_size} if block_size else {}))
    return MaskedDrafter(sharp_transformer(seed=3), objective)


@pytest.mark.parametrize("drafter", ["independent", "near", "masked", "block"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculative_tokens_are_the_ar_samplers(drafter, k):
    target = sharp_transformer(seed=0)
    make = {"independent": lambda: ARDrafter(sharp_transformer(seed=1), AR_OBJ),
            "near": lambda: ARDrafter(near_copy(target, 2, 0.3), AR_OBJ),
            "masked": masked_drafter, "block": lambda: masked_drafter(block_size=2)}[drafter]
    sampler = SpeculativeSampler(make(), draft_length=k, temperature=0.0)
    prompts = PROMPTS + [[i, (3 * i) % 36, (7 * i) % 36] for i in range(12)]
    ar = ARSampler(temperature=0.0).generate(target, AR_OBJ, prompts, 10)
    batch = sampler.generate(target, AR_OBJ, prompts, 10)
    assert torch.equal(batch.tokens, ar.tokens) and torch.equal(batch.lengths, ar.lengths)
    for i, p in enumerate(PROMPTS):  # batch = singles (left padding, rows advancing by their own counts)
        alone = sampler.generate(target, AR_OBJ, [p], 10)
        assert torch.equal(alone.tokens[0], batch.tokens[i])
        assert alone.nfe == batch.row_nfe[i]


def test_rows_advance_independently_and_report_their_costs():
    target = sharp_transformer(seed=0)
    sampler = SpeculativeSampler(ARDrafter(near_copy(target, 2, 0.3), AR_OBJ), draft_length=3, temperature=1.0)
    out = sampler.generate(target, AR_OBJ, PROMPTS, 12, seed=7)
    for i, p in enumerate(PROMPTS):  # the same draws, row by row
        alone = sampler.generate(target, AR_OBJ, [p], 12, seed=7 + i)
        assert torch.equal(alone.tokens[0], out.tokens[i]) and alone.nfe == out.row_nfe[i]
    # the batch runs as long as its slowest row, plus the prompts' prefill (which a row with no prompt skips alone)
    assert int(out.row_nfe.max()) <= out.nfe <= int(out.row_nfe.max()) + 1
    assert out.positions > 0 and 0 <= sampler.stats["acceptance_rate"] <= 1
    assert 1 <= sampler.stats["tokens_per_verification"] <= 4


@torch.no_grad()
def exact_continuations(model, prompt, length, top_k, temperature=1.0):
    """{continuation (EOS and after as PAD, as samplers trim): probability} under AR sampling, enumerated."""
    warp = Warp(temperature, top_k)
    out = {}

    def walk(seq, prob):
        gen = seq[1 + len(prompt):]
        if len(gen) == length or (gen and gen[-1] == SPECIAL.eos):
            toks, _ = trim_at_eos(torch.tensor([gen + [SPECIAL.pad] * (length - len(gen))]), SPECIAL)
            key = tuple(toks[0].tolist())
            out[key] = out.get(key, 0.0) + prob
            return
        logits = model.logits(model(ids=torch.tensor([seq]), causal=True)[:, -1]).float()
        logits[..., SPECIAL.mask] = float("-inf")
        p = warp(logits)[0].double()
        for x in p.nonzero().squeeze(1).tolist():
            walk(seq + [x], prob * p[x].item())

    walk([SPECIAL.bos] + list(prompt), 1.0)
    return out


def tv_and_bound(exact: dict, samples: list[tuple], replicas: int = 400):
    """TV(empirical, exact) and its bound under multinomial sampling of as many draws: the mean + 5 sd of the
    TV of `replicas` simulated multinomial samples from the exact distribution."""
    keys = list(exact)
    index = {key: i for i, key in enumerate(keys)}
    probs = torch.tensor([exact[key] for key in keys], dtype=torch.float64)
    assert abs(probs.sum().item() - 1) < 1e-5  # float32 softmaxes
    probs = probs / probs.sum()
    n = len(samples)
    counts = torch.zeros(len(keys) + 1, dtype=torch.float64)  # a last cell for anything outside the support
    for s in samples:
        counts[index.get(s, len(keys))] += 1
    full = torch.cat([probs, torch.zeros(1, dtype=torch.float64)])
    tv = 0.5 * (counts / n - full).abs().sum().item()
    g = torch.Generator().manual_seed(0)
    sims = torch.multinomial(probs, n * replicas, replacement=True, generator=g).view(replicas, n)
    sim_counts = torch.zeros(replicas, len(keys), dtype=torch.float64).scatter_add_(1, sims, torch.ones_like(sims, dtype=torch.float64))
    sim_tv = 0.5 * (sim_counts / n - probs).abs().sum(1)
    chi = stats.chisquare(counts[:-1].numpy(), probs.numpy() * n).pvalue if counts[-1] == 0 else 0.0
    return tv, (sim_tv.mean() + 5 * sim_tv.std()).item(), chi


N_EXACT = 20_000


@pytest.fixture(scope="module")
def exactness_setup():
    target = sharp_transformer(seed=0, scale=20.0)
    prompt = [1, 2, 3]
    exact = exact_continuations(target, prompt, 3, top_k=4)
    return target, prompt, exact


def speculative_samples(sampler, target, prompt, n=N_EXACT, chunk=5000, objective=AR_OBJ):
    samples = []
    for start in range(0, n, chunk):
        out = sampler.generate(target, objective, [prompt] * chunk, 3, seed=1000 + start)
        samples += [tuple(row) for row in out.tokens.tolist()]
    return samples


def test_temperature_one_samples_have_the_exact_ar_distribution(exactness_setup):
    target, prompt, exact = exactness_setup
    sampler = SpeculativeSampler(ARDrafter(near_copy(target, 2, 0.5), AR_OBJ), draft_length=2, top_k=4)
    tv, bound, chi = tv_and_bound(exact, speculative_samples(sampler, target, prompt))
    print(f"\nexact: {len(exact)} continuations; TV {tv:.4f} (bound {bound:.4f}), chi-square p {chi:.3g}; "
          f"acceptance {sampler.stats['acceptance_rate']:.2f}, "
          f"tokens/verification {sampler.stats['tokens_per_verification']:.2f}")
    assert tv < bound and chi > 1e-4
    assert 0.2 < sampler.stats["acceptance_rate"] < 0.95  # both branches of the rule are exercised


@pytest.mark.parametrize("wrong", [resample_from_p, accept_with_p])
def test_a_wrong_rule_fails_the_same_check(exactness_setup, monkeypatch, wrong):
    target, prompt, exact = exactness_setup
    sampler = SpeculativeSampler(ARDrafter(near_copy(target, 2, 0.5), AR_OBJ), draft_length=2, top_k=4)
    monkeypatch.setattr(sampler, "rule", wrong)
    tv, bound, chi = tv_and_bound(exact, speculative_samples(sampler, target, prompt))
    print(f"\n{wrong.__name__}: TV {tv:.4f} (bound {bound:.4f}), chi-square p {chi:.3g}")
    assert tv > bound and chi < 1e-8


def test_a_masked_drafter_keeps_the_ar_distribution(exactness_setup):
    target, prompt, exact = exactness_setup
    sampler = SpeculativeSampler(masked_drafter(), draft_length=3, top_k=4)
    tv, bound, chi = tv_and_bound(exact, speculative_samples(sampler, target, prompt, n=10_000))
    assert tv < bound and chi > 1e-4


# -- refusals -----------------------------------------------------------------------------------------------
def test_refusals_are_one_line():
    with pytest.raises(DiffuseError, match="checkpoint path"):
        SpeculativeSampler(drafter="/some/ckpt")
    with pytest.raises(DiffuseError, match="draft_length"):
        SpeculativeSampler(ARDrafter(tiny_transformer(), AR_OBJ), draft_length=0)
    target = sharp_transformer(seed=0)
    with pytest.raises(DiffuseError, match="needs a drafter"):
        SpeculativeSampler().generate(target, AR_OBJ, [[1]], 4)
    other = ARDrafter(tiny_transformer(vocab_size=50, seed=1), AR_OBJ)
    with pytest.raises(DiffuseError, match="another tokenizer"):
        SpeculativeSampler(other).generate(target, AR_OBJ, [[1]], 4)


# -- (3) the CLI ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_runs(corpus, tmp_path_factory):
    runs = {}
    for name, extra in (("ar", ["objective=autoregressive"]), ("ar2", ["objective=autoregressive", "seed=1"]),
                        ("masked", [])):
        run_dir = tmp_path_factory.mktemp(f"spec_{name}")
        result = call_main("diffuse.train", *tiny_args(corpus, run_dir, *extra))
        assert result.returncode == 0, result
        runs[name] = run_dir / "checkpoints" / "last.ckpt"
    return runs


@pytest.mark.parametrize("drafter", ["ar2", "masked"])
def test_sample_cli_runs_speculative_sampling(tiny_runs, tmp_path, drafter):
    result = call_main("diffuse.sample", f"ckpt={tiny_runs['ar']}", "sampler=speculative",
                       f"sampler.drafter={tiny_runs[drafter]}", "sampler.draft_length=4", "num_samples=3",
                       "length=16", "temperature=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result
    assert (tmp_path / "samples.jsonl").is_file() and '"sampler": "speculative"' in (tmp_path / "samples.jsonl").read_text()
    greedy = call_main("diffuse.sample", f"ckpt={tiny_runs['ar']}", "sampler=ar", "num_samples=3", "length=16",
                       "temperature=0", f"hydra.run.dir={tmp_path / 'ar'}")
    assert greedy.returncode == 0, greedy
    texts = lambda out: [line for line in out.splitlines() if not line.startswith("---") and "samples written" not in line]
    assert texts(result.stdout) == texts(greedy.stdout)  # greedy: the AR sampler's text
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["length"] for r in records] == [json.loads(line)["length"] for line in
                                               (tmp_path / "ar" / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("drafter", ["ar2", "masked"])
def test_the_run_layer_loads_the_drafter_and_greedy_tokens_are_the_ar_samplers(tiny_runs, drafter):
    train_cfg, tokenizer, module = load_run(str(tiny_runs["ar"]))
    cfg = OmegaConf.create({"sampler": {"name": "speculative", "drafter": str(tiny_runs[drafter]),
                                        "draft_length": 4, "temperature": 0.0}})
    spec = sampler_spec(cfg, train_cfg, module.objective)
    assert isinstance(spec["drafter"], Drafter) and not spec["drafter"].backbone.training
    sampler = build_sampler(spec, module.objective)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("The cat", "A", "", "quick brown fox")]
    out = sampler.generate(module.backbone, module.objective, prompts, 24)
    greedy = ARSampler(temperature=0.0).generate(module.backbone, module.objective, prompts, 24)
    assert torch.equal(out.tokens, greedy.tokens)
    print(f"\ntiny trained AR target, {drafter} drafter, k=4, greedy: acceptance "
          f"{sampler.stats['acceptance_rate']:.2f}, tokens/verification {sampler.stats['tokens_per_verification']:.2f}, "
          f"NFE {out.nfe} (AR: {greedy.nfe})")


def test_a_drafter_path_in_a_training_config_is_refused_in_one_line(corpus, tmp_path):
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "objective=autoregressive",
                                                     "sampler=speculative", "sampler.drafter=/some/last.ckpt"))
    assert result.returncode != 0 and len(error_lines(result.stderr)) == 1
    assert "checkpoint path" in error_lines(result.stderr)[0]


def test_sample_cli_refuses_a_drafter_with_another_tokenizer(tiny_runs, corpus, tmp_path):
    run_dir = tmp_path / "bpe"
    trained = call_main("diffuse.train", *tiny_args(corpus, run_dir, "objective=autoregressive", "tokenizer=bpe",
                                                      "tokenizer.vocab_size=300"))
    assert trained.returncode == 0, trained
    result = call_main("diffuse.sample", f"ckpt={tiny_runs['ar']}", "sampler=speculative",
                       f"sampler.drafter={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=1", "length=4",
                       f"hydra.run.dir={tmp_path / 's'}")
    assert result.returncode != 0 and len(error_lines(result.stderr)) == 1
    assert "another tokenizer" in error_lines(result.stderr)[0]


class Uncached(torch.nn.Module):
    """The same transformer without a cache (as model=hf): the sampler re-runs each row's whole prefix."""

    time_conditioned = False

    def __init__(self, model):
        super().__init__()
        self.model, self.vocab_size = model, model.vocab_size

    def forward(self, **kw):
        return self.model(**kw)

    def logits(self, hidden):
        return self.model.logits(hidden)


def test_a_backbone_without_a_cache_gives_the_same_samples():
    target = sharp_transformer(seed=0)
    sampler = SpeculativeSampler(ARDrafter(near_copy(target, 2, 0.3), AR_OBJ), draft_length=3, temperature=1.0)
    cached = sampler.generate(target, AR_OBJ, PROMPTS, 10, seed=3)
    uncached = sampler.generate(Uncached(target), AR_OBJ, PROMPTS, 10, seed=3)
    assert torch.equal(cached.tokens, uncached.tokens)
    prefill = torch.tensor([len(p) > 0 for p in PROMPTS]).long()  # the cache's one pass over a prompt
    assert torch.equal(cached.row_nfe, uncached.row_nfe + prefill)


# -- (4) objective=hybrid drafts for itself ---------------------------------------------------------------------
def hybrid_objective(block_size=4):
    return Hybrid(build_schedule("linear"), SPECIAL, block_size=block_size)


def chain_batch(g, B=32, L=16, states=8, stay=0.75):
    """Rows of a Markov chain over tokens 0..7 (x+1 with probability `stay`, else uniform): what a block drafter
    can partly predict several tokens ahead."""
    x = torch.empty(B, L, dtype=torch.long)
    x[:, 0] = SPECIAL.bos
    x[:, 1] = torch.randint(0, states, (B,), generator=g)
    for j in range(2, L):
        step = torch.where(torch.rand(B, generator=g) < stay, 1, torch.randint(0, states, (B,), generator=g))
        x[:, j] = (x[:, j - 1] + step) % states
    return {"input_ids": x, "segment_ids": torch.ones_like(x)}


@pytest.fixture(scope="module")
def trained_hybrid():
    """A tiny transformer trained 150 steps as objective=hybrid (block 4) on the chain: its draft block agrees
    with its clean row part of the time (an untrained one's drafts are nearly always rejected)."""
    objective, model = hybrid_objective(4), tiny_transformer(seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = objective.loss(model, chain_batch(g), g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), objective


def test_the_hybrid_drafts_with_its_training_layouts_draft_block():
    """Draft block j of the training pass over [x ; MASK…] predicts x_{j·b…} from x_<j·b; the self-drafter, given
    the context x_1..x_{j·b−1} (BOS is its own), gives the same distributions, with left padding too."""
    model, objective = sharp_transformer(seed=0), hybrid_objective(4)
    drafter = HybridDrafter(model, objective)
    assert isinstance(drafter, (Drafter, HybridDrafter)) and drafter.passes(4) == 1
    assert (drafter.draft_length, drafter.max_draft_length) == (4, 4)
    x = torch.randint(0, 36, (1, 12), generator=torch.Generator().manual_seed(0))
    x[0, 0] = SPECIAL.bos
    with torch.no_grad():
        train = model(ids=torch.cat([x, torch.full_like(x, SPECIAL.mask)], 1),
                      layout=BlockLayout.clean_and_draft(12, 4))
        train_logits = model.logits(train[:, 12:]).float()
    train_logits[..., SPECIAL.mask] = float("-inf")
    warp = Warp(temperature=1.0)
    contexts = [x[0, 1:8].tolist(), x[0, 1:4].tolist(), [5, 6]]  # blocks 2 and 1, and a shorter row (left padding)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    tokens, q = drafter.draft(contexts, 4, gens, warp)
    torch.testing.assert_close(q[0], warp(train_logits[0, 8:12]), rtol=0, atol=1e-5)
    torch.testing.assert_close(q[1], warp(train_logits[0, 4:8]), rtol=0, atol=1e-5)
    alone, q_alone = drafter.draft([contexts[1]], 4, [torch.Generator().manual_seed(1)], warp)
    torch.testing.assert_close(q_alone[0], q[1], rtol=0, atol=1e-5)
    assert torch.equal(alone[0], tokens[1]) and drafter.positions == (8 + 4) + (4 + 4)  # the batch's widths
    # k < b: the first k positions of a block of k masks (shorter blocks end documents in training)
    _, q2 = drafter.draft([contexts[0]], 2, [torch.Generator()], warp)
    assert q2.shape == (1, 2, VOCAB)


@pytest.mark.parametrize("predraft", [False, True])
@pytest.mark.parametrize("k", [None, 1, 3, 4])
def test_greedy_hybrid_self_drafting_gives_the_ar_samplers_tokens(trained_hybrid, k, predraft):
    if predraft and k == 4:
        pytest.skip("a pre-draft block of 4 drops its first slot: k ≤ 3 (refused in test_hybrid_draft_length_…)")
    prompts = PROMPTS + [[i % 8, (3 * i) % 8, (7 * i) % 36] for i in range(12)] + [[0, 1, 2, 3, 4, 5, 6]]
    for model, objective in (trained_hybrid, (sharp_transformer(seed=0), hybrid_objective(4))):
        sampler = SpeculativeSampler(draft_length=k, temperature=0.0, predraft=predraft)
        ar = ARSampler(temperature=0.0).generate(model, objective, prompts, 10)
        batch = sampler.generate(model, objective, prompts, 10)
        assert sampler.stats["draft_length"] == (k or (3 if predraft else 4))
        assert sampler.stats["predraft"] is predraft
        assert torch.equal(batch.tokens, ar.tokens) and torch.equal(batch.lengths, ar.lengths)
        for i, p in enumerate(prompts[:8]):  # batch = singles (left padding)
            alone = sampler.generate(model, objective, [p], 10)
            assert torch.equal(alone.tokens[0], batch.tokens[i]) and alone.nfe == batch.row_nfe[i]
    # the trained drafter is right most of the time on the chain: fewer passes than AR
    model, objective = trained_hybrid
    sampler = SpeculativeSampler(draft_length=k, temperature=0.0, predraft=predraft)
    out = sampler.generate(model, objective, [[0, 1, 2]], 12)
    ar_nfe = ARSampler(temperature=0.0).generate(model, objective, [[0, 1, 2]], 12).nfe
    assert sampler.stats["acceptance_rate"] > 0.5
    assert out.nfe < ar_nfe or k == 1  # (k = 1 in two passes: at most two tokens per draft-and-verify)
    K = k or (3 if predraft else 4)
    if predraft:  # one pass per step (after the prefill) over the clean tail and k+1 blocks of k+1 masks (none
        # verified on the first step): fewer passes than drafting and verifying apart, and at most k + 1 tokens each
        steps = out.nfe - 1
        assert sampler.stats["draft_positions"] == (K + 1) + (steps - 1) * (K + 1) ** 2
        assert 12 / steps <= K + 1
    else:  # drafted against the target's cache: 1 + k positions per draft (the prefill, then a draft and a verification)
        assert sampler.stats["draft_positions"] == (out.nfe - 1) // 2 * (K + 1)


def test_one_fused_pass_gives_the_verification_and_each_outcomes_draft_block():
    """verify_and_predraft against the cache (ragged tails, rows in any order) gives, per row, the AR pass's
    outputs on [tail ; drafts] and, for each outcome a, the draft block that `draft` runs on the context extended
    by d_1..d_a (slots 1..k of a block of k+1); the cache keeps its old columns untouched."""
    from diffuse.sampling.base import left_padded

    model, objective = sharp_transformer(seed=0), hybrid_objective(4)
    drafter, warp = HybridDrafter(model, objective), Warp(temperature=1.0)
    g = torch.Generator().manual_seed(3)
    contexts = [torch.randint(0, 36, (n,), generator=g).tolist() for n in (2, 5, 9)]
    tails = [c[-(1 + j % 2):] for j, c in enumerate(contexts)]
    k, n = 3, 2
    drafts = torch.randint(0, 36, (3, n), generator=g)
    heads = [c[: len(c) - len(t)] for c, t in zip(contexts, tails)]
    head, seg = left_padded(heads, SPECIAL, "cpu")
    cache = model.new_cache(64)
    with torch.no_grad():
        model(ids=head, segment_ids=seg, causal=True, cache=cache)
        rows = [2, 0, 1]
        h_clean, h_blocks, width = drafter.verify_and_predraft(cache, [tails[r] for r in rows], drafts[rows], rows,
                                                               3, k)
        assert width == max(len(t) for t in tails) + n + (n + 1) * (k + 1)
        for j, r in enumerate(rows):
            full = [SPECIAL.bos] + contexts[r] + drafts[r].tolist()
            ar = model.logits(model(ids=torch.tensor([full]), causal=True))[0, len(contexts[r]):]
            torch.testing.assert_close(model.logits(h_clean[j]), ar, rtol=0, atol=1e-4)
            for a in range(n + 1):
                _, q = drafter.draft([contexts[r] + drafts[r, :a].tolist()], k + 1, [torch.Generator()], warp)
                _, q_fused = drafter.propose(h_blocks[j, a][None], [torch.Generator()], warp)
                torch.testing.assert_close(q_fused[0], q[0, 1:], rtol=0, atol=1e-5)


def test_pre_drafting_halves_the_passes_of_drafting_and_verifying_apart(trained_hybrid):
    """On the chain the trained drafter is mostly right: the fused loop runs one pass per step where the two-pass
    loop runs two; its drafts do not know the step's correction token, so it accepts somewhat less (measured on
    this model: 17 passes apart, 12 fused, for 24 tokens)."""
    model, objective = trained_hybrid
    nfe, stats = {}, {}
    for predraft in (False, True):
        sampler = SpeculativeSampler(draft_length=3, temperature=0.0, predraft=predraft)
        nfe[predraft] = sampler.generate(model, objective, [[0, 1, 2]], 24).nfe
        stats[predraft] = sampler.stats
    assert nfe[True] < 0.75 * nfe[False], (nfe, stats)


@pytest.mark.parametrize("predraft", [False, True])
def test_hybrid_self_drafting_at_temperature_one_has_the_exact_ar_distribution(trained_hybrid, predraft):
    model, objective = trained_hybrid
    prompt = [1, 2, 3]
    exact = exact_continuations(model, prompt, 3, top_k=4)
    sampler = SpeculativeSampler(draft_length=3 if not predraft else 2, top_k=4, predraft=predraft)
    samples = speculative_samples(sampler, model, prompt, n=N_EXACT // (2 if predraft else 1), objective=objective)
    tv, bound, chi = tv_and_bound(exact, samples)
    print(f"\nhybrid self-drafter (predraft={predraft}): {len(exact)} continuations; TV {tv:.4f} (bound {bound:.4f}), chi-square p "
          f"{chi:.3g}; acceptance {sampler.stats['acceptance_rate']:.2f}, "
          f"tokens/verification {sampler.stats['tokens_per_verification']:.2f}")
    assert tv < bound and chi > 1e-4
    assert 0.2 < sampler.stats["acceptance_rate"] < 0.95  # both branches of the rule are exercised


def test_hybrid_draft_length_defaults_to_its_block_and_a_longer_one_is_one_line():
    model = sharp_transformer(seed=0)
    for b, k, fused_k in ((2, 2, 1), (8, 4, 4), (1, 1, None)):  # a block of 1 cannot pre-draft: two passes
        sampler = SpeculativeSampler(temperature=0.0, predraft=False)
        sampler.generate(model, hybrid_objective(b), [[1, 2]], 5)
        assert sampler.stats["draft_length"] == k
        sampler = SpeculativeSampler(temperature=0.0)  # predraft=null: whenever it can
        sampler.generate(model, hybrid_objective(b), [[1, 2]], 5)
        assert sampler.stats["draft_length"] == (fused_k or k) and sampler.stats["predraft"] is (fused_k is not None)
    with pytest.raises(DiffuseError) as err:
        SpeculativeSampler(draft_length=5, predraft=False).generate(model, hybrid_objective(4), [[1]], 4)
    assert str(err.value) == ("sampler.draft_length=5 is more than objective=hybrid's draft block drafts at once "
                              "(4 tokens); use sampler.draft_length ≤ 4, or null for 4")
    with pytest.raises(DiffuseError) as err:
        SpeculativeSampler(draft_length=4).generate(model, hybrid_objective(4), [[1]], 4)
    assert str(err.value) == ("sampler.draft_length=4 is more than objective=hybrid's draft block pre-drafts (its "
                              "block less one) (3 tokens); use sampler.draft_length ≤ 3, or null for 3")
    with pytest.raises(DiffuseError, match="sampler.predraft=true needs objective=hybrid"):
        SpeculativeSampler(predraft=True).generate(model, hybrid_objective(1), [[1]], 4)
    # an explicit drafter still wins over the hybrid's own
    other = ARDrafter(sharp_transformer(seed=1), AR_OBJ)
    sampler = SpeculativeSampler(other, draft_length=6, temperature=0.0)
    sampler.generate(model, hybrid_objective(4), [[1]], 6)
    assert sampler.stats["draft_length"] == 6 and other.positions > 0


def test_sample_cli_decodes_a_hybrid_with_speculative_sampling_by_default(corpus, tmp_path):
    run = tmp_path / "hybrid"
    trained = call_main("diffuse.train", *tiny_args(corpus, run, "objective=hybrid", "objective.block_size=4",
                                                      "trainer.max_steps=30", "trainer.val_check_interval=30"))
    assert trained.returncode == 0, trained
    ckpt = run / "checkpoints" / "last.ckpt"
    common = ["num_samples=3", "length=16", "prompt=The"]
    spec = call_main("diffuse.sample", f"ckpt={ckpt}", *common, "sampler.temperature=0", f"hydra.run.dir={tmp_path / 's'}")
    assert spec.returncode == 0, spec
    ar = call_main("diffuse.sample", f"ckpt={ckpt}", *common, "sampler=ar", "sampler.temperature=0",
                   f"hydra.run.dir={tmp_path / 'a'}")
    assert ar.returncode == 0, ar
    records = {name: [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
               for name in ("s", "a")}
    assert {r["sampler"] for r in records["s"]} == {"speculative"} and {r["sampler"] for r in records["a"]} == {"ar"}
    assert [r["text"] for r in records["s"]] == [r["text"] for r in records["a"]]
    assert [r["length"] for r in records["s"]] == [r["length"] for r in records["a"]]
    too_long = call_main("diffuse.sample", f"ckpt={ckpt}", "num_samples=1", "length=4", "sampler.draft_length=8",
                         f"hydra.run.dir={tmp_path / 'x'}")
    assert too_long.returncode != 0 and len(error_lines(too_long.stderr)) == 1
    assert "sampler.draft_length=8 is more than objective=hybrid's draft block" in error_lines(too_long.stderr)[0]


@pytest.mark.parametrize("tail", [1, 3])
def test_the_hybrid_drafts_against_the_targets_cache_as_without_it(tail):
    """draft_with_cache (the sampler's path when the target is the drafter's own cached network): with the cache
    holding each row's context but its last `tails` tokens (ragged, as the sampler leaves them), the call over
    [tail ; MASK × k] gives the uncached call's q at several context lengths (left padding), costs
    max(tail) + k positions, and leaves the cache as it found it."""
    from diffuse.sampling.base import left_padded

    drafter = HybridDrafter(sharp_transformer(seed=0), hybrid_objective(4))
    g = torch.Generator().manual_seed(5)
    contexts = [torch.randint(0, 36, (n,), generator=g).tolist() for n in (1, 3, 6, 11)]
    tails = [c[-min(tail + j % 2, len(c)):] for j, c in enumerate(contexts)]  # ragged: tail or tail + 1
    warp = Warp(temperature=1.0)
    for k in (1, 4):
        ref_tokens, ref_q = drafter.draft(contexts, k, [torch.Generator().manual_seed(i) for i in range(4)], warp)
        heads = [c[: len(c) - len(t)] for c, t in zip(contexts, tails)]
        head, seg = left_padded(heads, SPECIAL, "cpu")  # [PAD…, BOS, context without its tail]
        cache = drafter.backbone.new_cache(64)
        with torch.no_grad():
            drafter.backbone(ids=head, segment_ids=seg, causal=True, cache=cache)
        before, length = drafter.positions, cache.length
        rows = [0, 2, 3, 1] if k == 1 else [3, 0, 2]  # drafting rows in any order; row 1 (k = 4) is done
        tokens, q = drafter.draft_with_cache(cache, [tails[r] for r in rows], rows, 4, k,
                                             [torch.Generator().manual_seed(r) for r in rows], warp)
        torch.testing.assert_close(q, ref_q[rows], rtol=0, atol=1e-5)
        assert torch.equal(tokens, ref_tokens[rows])
        assert drafter.positions - before == max(len(tails[r]) for r in rows) + k and cache.length == length
