"""Distillation (diffuse/distillation, python -m diffuse.distill): the divergences, SDTT's time grid, its
teacher targets (ancestral reveal rate, target identities, prompts never masked) and loss, ordinary
student checkpoints, the CLI end to end (rounds, resume, a student that never loads its teacher, one-line
errors), CDLM's recorded trajectories (their identity with the teacher's predictions) and CDLM's loss."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import SPECIAL, VOCAB, FixedLogits, ZeroBackbone, call_main, error_lines, tiny_args, tiny_transformer
from diffuse.distillation import trajectories as traj
from diffuse.distillation.cdlm import CDLM
from diffuse.distillation.divergences import kl, mse, pick_divergence, reverse_kl, tvd
from diffuse.distillation.sdtt import SDTT
from diffuse.errors import DiffuseError
from diffuse.run.frozen import Frozen
from diffuse.run.module import DiffusionLM
from diffuse.objectives.llada import LLaDA
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.registry import OBJECTIVES
from diffuse.schedules import build_schedule

MASK = SPECIAL.mask


def masked_discrete(schedule="linear", **kw):
    return MaskedDiscrete(build_schedule(schedule), SPECIAL, **kw)


def batch_of(B=4, L=16, seed=0):
    ids = torch.randint(0, 36, (B, L), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = SPECIAL.bos
    return {"input_ids": ids, "segment_ids": torch.ones_like(ids)}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Recorder(nn.Module):
    """Delegates to a backbone and records the ids (and t) of every forward."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.seen: list[torch.Tensor] = []
        self.times: list[torch.Tensor] = []

    @property
    def time_conditioned(self):
        return self.net.time_conditioned

    @property
    def vocab_size(self):
        return self.net.vocab_size

    def forward(self, ids=None, t=None, **kw):
        self.seen.append(ids.clone())
        self.times.append(None if t is None else t.clone())
        return self.net(ids=ids, t=t, **kw)

    def logits(self, hidden):
        return self.net.logits(hidden)


# -- divergences ----------------------------------------------------------------------------------
def random_logp(shape, seed):
    return torch.randn(*shape, generator=gen(seed)).log_softmax(-1)


@pytest.mark.parametrize("div", [kl, reverse_kl, mse, tvd])
def test_divergence_of_identical_distributions_is_zero(div):
    p = random_logp((3, 5, 7), 0)
    assert torch.allclose(div(p, p), torch.zeros(3, 5), atol=1e-7)
    q = random_logp((3, 5, 7), 1)
    assert (div(p, q) > 1e-4).all()  # and not zero for different ones


def test_kl_is_nonnegative_and_matches_a_hand_computation():
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([0.25, 0.5, 0.25])
    want = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # Σ p log(p/q) = 0.25·ln 2
    assert kl(p.log(), q.log()).item() == pytest.approx(want, abs=1e-6)
    assert kl(q.log(), p.log()).item() == pytest.approx(0.25 * math.log(0.5) + 0.5 * math.log(2), abs=1e-6)
    a, b = random_logp((64, 11), 2), random_logp((64, 11), 3)
    assert (kl(a, b) >= 0).all()
    # against torch's own KL (input = log q, target = log p)
    ref = torch.nn.functional.kl_div(b, a, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl(a, b), ref, atol=1e-6)


def test_reverse_kl_is_the_student_to_teacher_kl_of_sdtts_reference():
    p = torch.tensor([0.5, 0.25, 0.25])  # target (teacher)
    q = torch.tensor([0.25, 0.5, 0.25])  # prediction (student)
    want = 0.25 * math.log(0.5) + 0.5 * math.log(2)  # Σ q log(q/p)
    assert reverse_kl(p.log(), q.log()).item() == pytest.approx(want, abs=1e-6)
    a, b = random_logp((64, 11), 2), random_logp((64, 11), 3)
    assert torch.allclose(reverse_kl(a, b), kl(b, a)) and not torch.allclose(reverse_kl(a, b), kl(a, b), atol=1e-3)
    assert (reverse_kl(a, b) >= 0).all()
    # SDTT's `kl-bwd`: F.kl_div(target, preds, log_target=True, reduction="batchmean") with preds the student's
    ref = torch.nn.functional.kl_div(a, b, log_target=True, reduction="batchmean")
    assert reverse_kl(a, b).mean().item() == pytest.approx(ref.item(), rel=1e-5)
    # a student that puts mass where the teacher has none costs infinity (mode-seeking), the other way round not
    teacher = torch.tensor([[0.0, float("-inf")]])
    student = torch.tensor([0.5, 0.5]).log()[None]
    assert reverse_kl(teacher, student).item() == float("inf")
    assert kl(teacher, student).item() == pytest.approx(math.log(2))


def test_tvd_in_unit_interval_and_one_for_disjoint_one_hots():
    a, b = random_logp((64, 11), 4), random_logp((64, 11), 5)
    d = tvd(a, b)
    assert ((d >= 0) & (d <= 1)).all()
    one_hot = torch.full((2, 6), float("-inf"))
    one_hot[0, 1] = 0.0
    one_hot[1, 4] = 0.0
    assert tvd(one_hot[:1], one_hot[1:]).item() == pytest.approx(1.0)
    assert tvd(one_hot[:1], one_hot[:1]).item() == pytest.approx(0.0)
    # and MSE of disjoint one-hots is 2
    assert mse(one_hot[:1], one_hot[1:]).item() == pytest.approx(2.0)


def test_kl_with_subs_one_hot_target_has_no_nan():
    target = torch.full((4, 6), float("-inf"))
    target[torch.arange(4), torch.tensor([0, 2, 3, 5])] = 0.0  # log 1 on one token, log 0 elsewhere
    pred = random_logp((4, 6), 6)
    pred[:, 1] = float("-inf")  # a prediction that is impossible where the target is too (SUBS [MASK])
    out = kl(target, pred)
    assert torch.isfinite(out).all()
    want = -pred[torch.arange(4), torch.tensor([0, 2, 3, 5])]  # KL(δ_x ‖ q) = −log q(x)
    assert torch.allclose(out, want, atol=1e-6)
    assert kl(target, target).abs().max().item() == 0.0


def test_pick_divergence_refuses_unknown_names():
    assert pick_divergence("tvd") is tvd
    with pytest.raises(DiffuseError, match="method.divergence"):
        pick_divergence("bad")


# -- SDTT: grid and targets -----------------------------------------------------------------------
@pytest.mark.parametrize("steps,k", [(4, 2), (3, 3), (1, 2)])
def test_student_grid_is_every_kth_point_of_the_teachers(steps, k):
    obj = masked_discrete()
    sdtt = SDTT(obj, ZeroBackbone(), student_steps=steps, k=k)
    grid = sdtt.grid("cpu")
    assert len(grid) == k * steps + 1
    assert grid[0].item() == 1.0 and grid[-1].item() == pytest.approx(obj.eps)
    assert torch.allclose(grid[::k], torch.linspace(1, obj.eps, steps + 1, dtype=torch.float64), atol=1e-12)
    assert (grid[1:] < grid[:-1]).all()


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "mse", "tvd"])
def test_identical_input_free_teacher_and_student_give_zero_loss(divergence):
    B, L = 4, 16
    logits = torch.randn(B, L, VOCAB, generator=gen(1))
    obj = masked_discrete()
    teacher, student = FixedLogits(logits), FixedLogits(logits)
    sdtt = SDTT(obj, teacher, student_steps=4, divergence=divergence)
    out = sdtt.loss(obj, student, batch_of(B, L), gen(0))
    assert out.n_tokens > 0
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    assert len(teacher.seen) == 2  # k teacher forwards per training step
    # a student that disagrees costs the mean over the masked positions of D(teacher ‖ student)
    other = FixedLogits(torch.randn(B, L, VOCAB, generator=gen(2)))
    got = sdtt.loss(obj, other, batch_of(B, L), gen(0))
    z = other.seen[0]
    masked = z == MASK
    want = pick_divergence(divergence)(obj.log_probs(logits, z)[masked], obj.log_probs(other.fixed, z)[masked]).mean()
    assert got.loss.item() > 1e-3
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.n_tokens == masked.sum()


def test_last_student_step_reveals_everything_and_keeps_given_tokens():
    B, L, N = 8, 32, 4
    obj = masked_discrete()
    sdtt = SDTT(obj, ZeroBackbone(), student_steps=N, k=2)
    batch = batch_of(B, L)
    x0 = batch["input_ids"]
    i = torch.full((B,), N - 1)
    t = sdtt.grid("cpu")[i * 2].float()[:, None]
    z = obj.corrupt(x0, t, obj.draw_noise(x0, gen(0)), batch)
    assert (z == MASK).any() and (z != MASK).any()
    target, z_next = sdtt.targets(obj, z, i, batch, gen(1))
    assert target.shape == (B, L, VOCAB)
    assert not (z_next == MASK).any()
    given = z != MASK
    assert torch.equal(z_next[given], z[given])
    # a given position's target is the one-hot on its token
    assert torch.equal(target[given].argmax(-1), z[given])
    assert torch.allclose(target[given].exp().sum(-1), torch.ones(int(given.sum())))
    # from an all-[MASK] state too, on many positions: the last grid step reveals every mask
    big = torch.randint(0, 36, (64, 64), generator=gen(2))
    big_batch = {"input_ids": big, "segment_ids": torch.ones_like(big)}
    _, z_last = sdtt.targets(obj, torch.full_like(big, MASK), torch.full((64,), N - 1), big_batch, gen(3))
    assert not (z_last == MASK).any()


@pytest.mark.parametrize("name", ["masked_discrete", "llada"])
def test_reveal_rate_is_the_ancestral_probability(name):
    B, L, N, k = 64, 64, 4, 2
    obj = masked_discrete("cosine") if name == "masked_discrete" else LLaDA(SPECIAL, build_schedule("linear"))
    sdtt = SDTT(obj, ZeroBackbone(), student_steps=N, k=k)
    grid = sdtt.grid("cpu")
    ids = torch.randint(0, 36, (B, L), generator=gen(0))
    batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids)}
    z = torch.full_like(ids, MASK)
    for i_ in (0, 1, 2):
        i = torch.full((B,), i_)
        _, z_next = sdtt.targets(obj, z, i, batch, gen(10 + i_))
        p_now, p_next = obj.mask_prob(grid[i_ * k]), obj.mask_prob(grid[(i_ + 1) * k])
        want = 1.0 - (p_next / p_now).item()
        got = (z_next != MASK).float().mean().item()
        assert got == pytest.approx(want, abs=0.03), (i_, got, want)


def test_targets_are_the_teachers_predictions_on_its_own_path():
    """k = 2: a position revealed at the first sub-step has target p_T(· | z, t_i); a position still masked
    after the first sub-step has the teacher's prediction on the intermediate state z' (at τ_1)."""
    B, L, N, k = 4, 16, 3, 2
    obj = masked_discrete()
    net = tiny_transformer(time_conditioning=True, seed=3)
    teacher = Recorder(net)
    sdtt = SDTT(obj, teacher, student_steps=N, k=k)
    grid = sdtt.grid("cpu")
    batch = batch_of(B, L, seed=4)
    x0 = batch["input_ids"]
    i = torch.tensor([0, 1, 2, 1])  # a student step per row
    t = grid[i * k].float()[:, None]
    z = obj.corrupt(x0, t, obj.draw_noise(x0, gen(5)), batch)
    target, z_next = sdtt.targets(obj, z, i, batch, gen(6))

    assert len(teacher.seen) == 2
    assert torch.equal(teacher.seen[0], z)
    z_mid = teacher.seen[1]
    tau0, tau1 = grid[i * k].float()[:, None], grid[i * k + 1].float()[:, None]
    assert torch.allclose(teacher.times[0], tau0.squeeze(-1)) and torch.allclose(teacher.times[1], tau1.squeeze(-1))
    with torch.no_grad():
        first = obj.predict(net, z, tau0, batch)
        second = obj.predict(net, z_mid, tau1, batch)
    masked = z == MASK
    revealed_first = masked & (z_mid != MASK)
    still = z_mid == MASK
    # the intermediate state only reveals masks of z, and the final one only those of z_mid
    assert torch.equal(z_mid[~masked], z[~masked]) and torch.equal(z_next[~still], z_mid[~still])
    assert revealed_first.sum() >= 3 and still.sum() >= 3, "the seed should exercise both cases"
    assert torch.allclose(target[revealed_first], first[revealed_first], atol=1e-5)
    assert torch.allclose(target[still], second[still], atol=1e-5)
    # and the two predictions really differ there (the identity is not trivially true)
    assert not torch.allclose(first[still], second[still], atol=1e-3)
    # the rows at the last student step (i = 2) end with no mask
    assert not (z_next[2] == MASK).any()


def test_student_reads_the_state_at_a_student_grid_time():
    """The student predicts from z at t_i (a point of its own grid), where the teacher's k steps start."""
    B, L, N, k = 16, 16, 4, 2
    obj = masked_discrete()
    teacher = Recorder(tiny_transformer(seed=1, time_conditioning=True))
    student = Recorder(tiny_transformer(seed=2, time_conditioning=True))
    sdtt = SDTT(obj, teacher, student_steps=N, k=k)
    student_grid = torch.linspace(1, obj.eps, N + 1)[:-1]
    for s in range(3):
        sdtt.loss(obj, student, batch_of(B, L, seed=s), gen(s))
    for r in range(3):
        t = student.times[r]
        assert torch.isclose(t[:, None], student_grid[None], atol=1e-6).any(1).all(), t
        assert torch.equal(t, teacher.times[2 * r]) and torch.equal(student.seen[r], teacher.seen[2 * r])
    assert len({round(float(x), 4) for t in student.times for x in t}) > 1  # several student steps drawn


def test_loss_trains_the_student_only():
    obj = masked_discrete()
    student, teacher = tiny_transformer(seed=0), tiny_transformer(seed=1)
    sdtt = SDTT(obj, teacher, student_steps=4)
    module = DiffusionLM(student, obj, distiller=sdtt)
    mine = {id(p) for p in module.parameters()}
    assert not mine & {id(p) for p in teacher.parameters()}
    assert all(not p.requires_grad for p in teacher.parameters())
    module.train()
    student.train()
    out = sdtt.loss(obj, student, batch_of(4, 16), gen(0))
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert not teacher.training  # the teacher stays in eval mode when its owner trains
    module.double()  # the teacher moves with the student
    assert next(teacher.parameters()).dtype == torch.float64


def test_llada_sft_never_masks_or_targets_the_prompt():
    B, L, P = 6, 16, 5
    obj = LLaDA(SPECIAL, build_schedule("linear"))
    batch = batch_of(B, L, seed=7)
    batch["input_ids"][:, L - 1] = SPECIAL.eos
    batch["prompt_mask"] = (torch.arange(L) < 1 + P).long().expand(B, L).clone()
    x0 = batch["input_ids"]
    prompt = batch["prompt_mask"].bool()
    # at t = 1 every maskable token is masked and no prompt one
    z = obj.corrupt(x0, torch.ones(B, 1), obj.draw_noise(x0, gen(0)), batch)
    assert not obj.still_noisy(z)[prompt].any()
    assert obj.still_noisy(z)[:, 1 + P: L - 1].all()

    teacher, student = Recorder(tiny_transformer(seed=1)), Recorder(tiny_transformer(seed=0))
    sdtt = SDTT(obj, teacher, student_steps=2)
    for s in range(4):
        out = sdtt.loss(obj, student, batch, gen(s))
        assert torch.isfinite(out.loss)
        assert 0 < out.n_tokens <= (~prompt).sum()
    for seen in teacher.seen + student.seen:
        assert torch.equal(seen[prompt], x0[prompt])
    assert any((seen == MASK).any() for seen in student.seen)
    # targets from a state at t_0 = 1 keep the prompt too
    i = torch.zeros(B, dtype=torch.long)
    _, z_next = sdtt.targets(obj, z, i, batch, gen(9))
    assert torch.equal(z_next[prompt], x0[prompt])


def test_sdtt_refuses_bad_arguments():
    obj = masked_discrete()
    with pytest.raises(DiffuseError, match="method.student_steps"):
        SDTT(obj, ZeroBackbone(), student_steps=0)
    with pytest.raises(DiffuseError, match=r"method\.k"):
        SDTT(obj, ZeroBackbone(), student_steps=4, k=1)
    with pytest.raises(DiffuseError, match="method.divergence"):
        SDTT(obj, ZeroBackbone(), student_steps=4, divergence="js")
    with pytest.raises(DiffuseError, match="method.teacher_temperature"):
        SDTT(obj, ZeroBackbone(), student_steps=4, teacher_temperature=0)
    for name in ("autoregressive", "continuous"):
        other = OBJECTIVES.build({"name": name}, schedule=build_schedule("linear"), special=SPECIAL)
        with pytest.raises(DiffuseError, match=f"method=sdtt.*{name}"):
            SDTT(other, ZeroBackbone(), student_steps=4)


# -- checkpoints stay ordinary --------------------------------------------------------------------
def test_a_distiller_adds_nothing_to_the_state_dict(tmp_path):
    obj = masked_discrete()
    plain = DiffusionLM(tiny_transformer(seed=0), obj)
    teacher = tiny_transformer(seed=1)
    with_sdtt = DiffusionLM(tiny_transformer(seed=0), masked_discrete(), distiller=SDTT(obj, teacher, 4))
    assert set(with_sdtt.state_dict()) == set(plain.state_dict())
    assert sum(p.numel() for p in with_sdtt.parameters()) == sum(p.numel() for p in plain.parameters())
    # a teacher wrapped in Frozen by hand too
    frozen = Frozen(tiny_transformer(seed=2), "somewhere.ckpt")
    also = DiffusionLM(tiny_transformer(seed=0), masked_discrete(), distiller=SDTT(obj, frozen, 4))
    assert set(also.state_dict()) == set(plain.state_dict())


# -- the CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, corpus) -> Path:
    """A tiny masked-diffusion teacher (byte tokenizer, 4 steps), trained in-process."""
    run = tmp_path_factory.mktemp("teacher")
    result = call_main("diffuse.train", *tiny_args(corpus, run, "trainer.max_steps=4", "trainer.val_check_interval=4"))
    assert result.returncode == 0, result
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def stored(ckpt: Path) -> dict:
    return torch.load(ckpt, weights_only=True, map_location="cpu")


def test_distill_cli_end_to_end(teacher_ckpt, tmp_path):
    from diffuse.run.load import load_run

    teacher = tmp_path / "teacher.ckpt"
    shutil.copy(teacher_ckpt, teacher)
    out = tmp_path / "distill"
    args = [f"teacher={teacher}", "rounds=2", "steps=8", "max_steps=3",
            'overrides=["debug=default","num_samples=0"]', f"hydra.run.dir={out}"]
    result = call_main("diffuse.distill", *args)
    assert result.returncode == 0, result
    r1, r2 = (out / f"round{r}" / "checkpoints" / "last.ckpt" for r in (1, 2))
    for r in (1, 2):
        assert (out / f"round{r}" / "checkpoints" / "last.ckpt").is_file()
        assert (out / f"round{r}" / "metrics.json").is_file()
    summary = json.loads((out / "distill.json").read_text())
    assert [s["round"] for s in summary] == [1, 2]
    assert [s["steps"] for s in summary] == [4, 2]
    assert [s["method"] for s in summary] == ["sdtt", "sdtt"]
    assert all(s["train/distill_loss"] is not None and math.isfinite(s["train/distill_loss"]) for s in summary)

    cfg1, cfg2 = stored(r1)["diffuse"]["config"], stored(r2)["diffuse"]["config"]
    assert cfg1["sampler"]["steps"] == 4 and cfg2["sampler"]["steps"] == 2
    assert cfg1["init_from"] == str(teacher) and cfg1["distill"]["teacher"] == str(teacher)
    assert cfg2["init_from"] == str(r1) and cfg2["distill"]["teacher"] == str(r1)
    assert cfg2["distill"]["name"] == "sdtt" and cfg2["distill"]["student_steps"] == 2
    assert cfg2["model"] == stored(teacher)["diffuse"]["config"]["model"]  # the teacher's model, inherited
    # an ordinary checkpoint: the same tensors as its teacher's, nothing of the teacher inside
    assert set(stored(r2)["state_dict"]) == set(stored(teacher)["state_dict"])

    # re-running skips the finished rounds
    mtime = r2.stat().st_mtime_ns, r1.stat().st_mtime_ns
    tic = time.perf_counter()
    again = call_main("diffuse.distill", *args)
    assert again.returncode == 0, again
    assert "done already" in again.stdout + again.stderr
    assert (r2.stat().st_mtime_ns, r1.stat().st_mtime_ns) == mtime
    assert time.perf_counter() - tic < 20
    assert [s["steps"] for s in json.loads((out / "distill.json").read_text())] == [4, 2]

    # a student never loads its teacher
    r1.rename(r1.with_name("moved.ckpt"))
    teacher.unlink()
    cfg, _, module = load_run(str(r2))
    assert module.distiller is None
    assert cfg.sampler.steps == 2
    sampled = call_main("diffuse.sample", f"ckpt={r2}", "num_samples=1", "length=8", "device=cpu",
                        f"hydra.run.dir={tmp_path / 'samples'}")
    assert sampled.returncode == 0, sampled
    rows = [json.loads(line) for line in (tmp_path / "samples" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 1


@pytest.mark.parametrize("extra,key", [
    (["steps=6", "rounds=2"], "steps=6"),
    (["method=cdlm", "rounds=2"], "rounds=2"),
    (["teacher=/nonexistent/t.ckpt"], "teacher="),
])
def test_distill_cli_errors_are_one_line(teacher_ckpt, tmp_path, extra, key):
    args = [f"teacher={teacher_ckpt}", "max_steps=2", f"hydra.run.dir={tmp_path / 'out'}", *extra]
    result = call_main("diffuse.distill", *args)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-2000:]
    assert key in lines[0]
    assert not (tmp_path / "out" / "round1" / "checkpoints").exists()


# a round that never validated (val/bpt None) still ends with its summary table
def test_distill_without_validation_finishes(teacher_ckpt, tmp_path):
    out = tmp_path / "out"
    result = call_main("diffuse.distill", f"teacher={teacher_ckpt}", "rounds=1", "steps=4", "max_steps=1",
                       'overrides=["debug=default","num_samples=0","trainer.limit_val_batches=0"]',
                       f"hydra.run.dir={out}")
    assert (out / "distill.json").is_file()  # the round itself trained
    assert result.returncode == 0, result


# method.k=1 is refused naming method.k, not steps
def test_distill_k1_error_names_method_k(teacher_ckpt, tmp_path):
    result = call_main("diffuse.distill", f"teacher={teacher_ckpt}", "method.k=1", "max_steps=1",
                       f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "method.k" in lines[0] and "divisible" not in lines[0], lines


def test_distill_cdlm_cli(teacher_ckpt, tmp_path):
    from diffuse.run.load import load_run

    out = tmp_path / "out"
    result = call_main("diffuse.distill", f"teacher={teacher_ckpt}", "method=cdlm", "method.num_trajectories=4",
                       "method.gen_length=8", "method.block_size=4", "method.top_k=4", "method.prompt_length=2",
                       "max_steps=2", 'overrides=["debug=default","num_samples=0"]', f"hydra.run.dir={out}")
    assert result.returncode == 0, result
    data = traj.load(str(out / "round1" / "trajectories.pt"))
    assert data["tokens"].shape == (4, traj.lead_width(2, 4) + 8) and data["block_size"] == 4
    ckpt = out / "round1" / "checkpoints" / "last.ckpt"
    cfg = stored(ckpt)["diffuse"]["config"]
    assert cfg["objective"]["block_size"] == 4
    assert cfg["sampler"]["name"] == "block" and cfg["sampler"]["threshold"] == 0.9
    assert cfg["distill"]["name"] == "cdlm" and cfg["distill"]["trajectories"] == str(out / "round1" / "trajectories.pt")
    assert not set(cfg["distill"]) & {"num_trajectories", "gen_length", "top_k", "threshold"}
    assert set(stored(ckpt)["state_dict"]) == set(stored(teacher_ckpt)["state_dict"])
    summary = json.loads((out / "distill.json").read_text())
    assert len(summary) == 1 and summary[0]["method"] == "cdlm" and summary[0]["steps"] == 4
    _, _, module = load_run(str(ckpt))  # without the trajectories or the teacher
    assert module.distiller is None and module.objective.block_size == 4


# -- CDLM trajectories ----------------------------------------------------------------------------
def check_trajectories(module, data, prompts, gen_length, b, top_k, cases):
    special = module.objective.special
    P = len(prompts[0])
    lead = traj.lead_width(P, b)
    assert data["lead"] == lead and data["block_size"] == b and data["gen_length"] == gen_length
    tokens, rank = data["tokens"], data["rank"]
    n = len(prompts)
    assert tokens.shape == (n, lead + gen_length) and rank.shape == (n, gen_length)
    assert data["top_ids"].shape == data["top_logp"].shape == (n, gen_length, top_k)
    assert (tokens[:, : lead - 1 - P] == special.pad).all()
    assert (tokens[:, lead - 1 - P] == special.bos).all()
    assert tokens[:, lead - P: lead].tolist() == prompts
    assert not (tokens[:, lead:] == special.mask).any()
    for row in range(n):
        for blk in range(gen_length // b):
            assert sorted(rank[row, blk * b:(blk + 1) * b].tolist()) == list(range(b))
    # the renormalised top-k log-probs are distributions
    assert torch.allclose(data["top_logp"].float().exp().sum(-1), torch.ones(n, gen_length), atol=1e-2)

    backbone, objective = module.backbone, module.objective
    for row, blk, j in cases:
        gen_part = tokens[row, lead:].clone()
        r = rank[row]
        in_block = (torch.arange(gen_length) // b) == blk
        later = (torch.arange(gen_length) // b) > blk
        gen_part[(in_block & (r >= j)) | later] = special.mask
        state = torch.cat([tokens[row, :lead], gen_part])[None]
        masked_frac = (gen_part == special.mask).float().mean().clamp_min(objective.eps)
        t = masked_frac.reshape(1, 1)
        batch = {"input_ids": state, "segment_ids": (state != special.pad).long()}
        with torch.no_grad():
            logp = objective.predict(backbone, state, t, batch)[0]
        pos = int((in_block & (r == j)).nonzero()[0])  # index in the generated span
        top = logp[lead + pos].topk(top_k)
        want = top.values.log_softmax(-1)
        got = data["top_logp"][row, pos].float()
        assert torch.allclose(got, want, atol=1e-2), (row, blk, j, got, want)
        assert set(data["top_ids"][row, pos].tolist()) == set(top.indices.tolist())
        # the committed token was the one at the recorded position (and it is an ordinary token)
        assert tokens[row, lead + pos] != special.mask


def test_trajectories_of_a_checkpoint_are_the_teachers_decoding(teacher_ckpt):
    from diffuse.run.load import load_run

    cfg, tokenizer, module = load_run(str(teacher_ckpt))
    assert not cfg.model.get("time_conditioning", False)  # t at recording time does not matter here
    prompts = [[104, 101], [97, 98], [120, 121]]  # bytes: P = 2, so lead = 4 with one pad column
    data = traj.record(module, prompts, gen_length=8, block_size=4, top_k=5, temperature=1.0, batch_size=2,
                       seed=0, progress=False)
    check_trajectories(module, data, prompts, 8, 4, 5, [(0, 0, 0), (0, 1, 2), (2, 0, 3), (1, 1, 1)])
    # the same seed records the same trajectories
    again = traj.record(module, prompts, gen_length=8, block_size=4, top_k=5, batch_size=2, seed=0, progress=False)
    assert torch.equal(again["tokens"], data["tokens"]) and torch.equal(again["rank"], data["rank"])


def test_trajectories_identity_with_a_time_conditioned_teacher():
    """With a time-conditioned teacher, t at recording is the masked fraction of the generated span."""
    module = DiffusionLM(tiny_transformer(seed=5, time_conditioning=True), masked_discrete())
    prompts = [[3, 4, 5], [6, 7, 8]]  # P = 3: lead = 4, no padding
    data = traj.record(module, prompts, gen_length=12, block_size=4, top_k=6, batch_size=8, seed=1,
                       progress=False)
    check_trajectories(module, data, prompts, 12, 4, 6, [(0, 0, 1), (1, 2, 3), (0, 1, 0), (1, 0, 2)])


def test_record_refuses_bad_requests():
    module = DiffusionLM(tiny_transformer(), masked_discrete(block_size=4))
    with pytest.raises(DiffuseError, match="block_size"):
        traj.record(module, [[1]], 8, 4, progress=False)
    module = DiffusionLM(tiny_transformer(), masked_discrete())
    with pytest.raises(DiffuseError, match="gen_length"):
        traj.record(module, [[1]], 6, 4, progress=False)
    with pytest.raises(DiffuseError, match="prompt"):
        traj.record(module, [[1], [1, 2]], 8, 4, progress=False)


# -- CDLM's loss ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab_trajectories(tmp_path_factory) -> Path:
    """Trajectories of a tiny VOCAB=40 teacher: 6 rows, prompts of 2, 8 generated tokens in blocks of 4."""
    module = DiffusionLM(tiny_transformer(seed=7), masked_discrete())
    prompts = [[int(x) for x in torch.randint(0, 36, (2,), generator=gen(s))] for s in range(6)]
    data = traj.record(module, prompts, gen_length=8, block_size=4, top_k=5, batch_size=4, seed=0, progress=False)
    path = tmp_path_factory.mktemp("traj") / "trajectories.pt"
    traj.save(data, path)
    return path


def test_cdlm_refuses_a_mismatched_block_size(vocab_trajectories):
    with pytest.raises(DiffuseError, match="block_size"):
        CDLM(masked_discrete(), str(vocab_trajectories), block_size=4)
    with pytest.raises(DiffuseError, match="block_size"):
        CDLM(masked_discrete(block_size=8), str(vocab_trajectories), block_size=4)
    with pytest.raises(DiffuseError, match="recorded with blocks of 4"):
        CDLM(masked_discrete(block_size=2), str(vocab_trajectories), block_size=2)
    with pytest.raises(DiffuseError, match="method.distill_weight"):
        CDLM(masked_discrete(block_size=4), str(vocab_trajectories), block_size=4, distill_weight=-1)
    with pytest.raises(DiffuseError, match="method.trajectories"):
        CDLM(masked_discrete(block_size=4), "/nonexistent/trajectories.pt", block_size=4)


def test_cdlm_loss_is_the_weighted_sum_of_its_terms(vocab_trajectories):
    obj = masked_discrete(block_size=4)
    student = tiny_transformer(seed=8)
    batch = batch_of(4, 12, seed=3)

    def run(w):
        cdlm = CDLM(obj, str(vocab_trajectories), 4, distill_weight=w[0], consistency_weight=w[1], dlm_weight=w[2])
        return cdlm.loss(obj, student, batch, gen(11))

    only_dlm = run((0, 0, 1))
    assert only_dlm.loss.item() == pytest.approx(only_dlm.metrics["dlm_loss"].item(), rel=1e-6)
    only_distill = run((1, 0, 0))
    assert only_distill.loss.item() == pytest.approx(only_distill.metrics["distill_loss"].item(), rel=1e-6)
    mixed = run((1.0, 2.0, 3.0))
    m = mixed.metrics
    assert m["distill_loss"].item() >= 0 and m["consistency_loss"].item() >= 0
    assert m["distill_loss"].item() == pytest.approx(only_distill.metrics["distill_loss"].item(), rel=1e-5)
    want = m["distill_loss"] + 2 * m["consistency_loss"] + 3 * m["dlm_loss"]
    assert mixed.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert mixed.n_tokens > 0 and torch.isfinite(mixed.nll_sum)


def test_cdlm_loss_has_gradients_and_adds_no_state(vocab_trajectories):
    obj = masked_discrete(block_size=4)
    student = tiny_transformer(seed=8).train()
    cdlm = CDLM(obj, str(vocab_trajectories), 4)
    module = DiffusionLM(student, obj, distiller=cdlm)
    plain = DiffusionLM(tiny_transformer(seed=8), masked_discrete(block_size=4))
    assert set(module.state_dict()) == set(plain.state_dict())
    out = cdlm.loss(obj, student, batch_of(4, 12, seed=3), gen(12))
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    assert out.metrics["distill_loss"].item() >= 0
    assert out.metrics["consistency_loss"].item() > 0  # a random student is not self-consistent
    out.loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
