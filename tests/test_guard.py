"""A non-finite loss or gradient norm skips the step exactly, on the device; K in a row stop the run in
one line (exit 2); no checkpoint holds non-finite weights and best.ckpt never records a NaN validation."""

from __future__ import annotations

import contextlib
import csv
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from conftest import call_main, error_lines, tiny_args, tiny_transformer
from diffuse.errors import DiffuseError
from diffuse.run.callbacks.guard import FiniteModelCheckpoint, NonFiniteGuard, check_finite_checkpoint, supports_found_inf

OPTIMIZERS = {
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd_fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
}


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def fake_trainer(step=0):
    return SimpleNamespace(global_step=step, accumulate_grad_batches=1, world_size=1, log_every_n_steps=1)


def run_steps(make_opt, inputs):
    """Train Net on `inputs` through the guard's hooks (as Lightning calls them); (net, optimizer)."""
    net = Net()
    opt = make_opt(list(net.parameters()))
    guard, trainer = NonFiniteGuard(max_consecutive=100), fake_trainer()
    guard.on_train_start(SimpleNamespace(optimizers=[opt]), net)
    for x, scale in inputs:
        opt.zero_grad(set_to_none=True)
        loss = net(x) * scale
        guard.on_before_backward(trainer, net, loss)
        loss.backward()
        guard.on_before_optimizer_step(trainer, net, opt)
        opt.step()
        trainer.global_step += 1
    return net, opt, guard


def inputs(*kinds):
    gen = torch.Generator().manual_seed(1)
    out = []
    for kind in kinds:
        x = torch.randn(8, 3, generator=gen)
        if kind == "nan":
            x[0, 0] = math.nan  # NaN loss and gradients
        out.append((x, 1e37 if kind == "huge" else 1.0))  # huge: a finite loss whose gradient norm overflows
    return out


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad", [(0,), (1,), (1, 2)], ids=["first", "middle", "two"])
def test_a_skipped_step_leaves_weights_and_optimizer_state_exactly_unchanged(name, bad):
    """Training on [ok, ok, ok] with non-finite batches inserted = training on [ok, ok, ok] alone, bit for bit
    (weights, moments, step counts), for fused optimizers (found_inf) and the host-sync fallback alike."""
    clean = inputs("ok", "ok", "ok")
    dirty = list(clean)
    for i in bad:
        dirty.insert(i, inputs("nan" if i % 2 else "huge")[0])
    ref_net, ref_opt, _ = run_steps(OPTIMIZERS[name], clean)
    net, opt, guard = run_steps(OPTIMIZERS[name], dirty)
    for p, q in zip(ref_net.parameters(), net.parameters()):
        assert torch.equal(p, q)
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert ref_state.keys() == state.keys()
    for k in ref_state:
        for key, value in ref_state[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[k][key])), (k, key)
    assert guard.state_dict()["skipped"] == len(bad)
    assert supports_found_inf(opt) == name.endswith("_fused")


def test_a_finite_loss_with_finite_gradients_after_an_infinite_loss_is_not_skipped():
    net, opt, guard = run_steps(OPTIMIZERS["adamw_fused"], inputs("ok", "ok"))
    assert guard.state_dict()["skipped"] == 0 and all(float(s["step"]) == 2 for s in opt.state.values())


class NoSync:
    """Make every tensor → host conversion raise (a CPU stand-in for torch.cuda.set_sync_debug_mode('error'))."""

    NAMES = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "cpu", "numpy")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def boom(*a, **k):
            raise AssertionError("host sync")

        for n in self.NAMES:
            setattr(torch.Tensor, n, boom)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def test_the_per_step_path_of_the_guard_and_of_ema_reads_nothing_on_the_host():
    from diffuse.run.callbacks.ema import EMA

    net = Net()
    opt = OPTIMIZERS["adamw_fused"](list(net.parameters()))
    guard, trainer = NonFiniteGuard(max_consecutive=2, check_every_n_steps=1000), fake_trainer()
    trainer.log_every_n_steps = 1000
    ema = EMA(decay=0.9)
    ema.setup(trainer, net, "fit")
    guard.on_train_start(SimpleNamespace(optimizers=[opt]), net)
    for i, (x, _) in enumerate(inputs("ok", "nan", "nan", "ok")):
        opt.zero_grad(set_to_none=True)
        # the first step is decided on the host (the optimizer state does not exist yet), the others on the device
        with NoSync() if i else contextlib.nullcontext():
            loss = net(x)
            guard.on_before_backward(trainer, net, loss)
            loss.backward()
            guard.on_before_optimizer_step(trainer, net, opt)
            opt.step()
            trainer.global_step += 1
            guard.on_train_batch_end(trainer, net, None, None, 0)  # not a check step
            ema.on_train_batch_end(trainer, net, None, None, 0)
    with pytest.raises(DiffuseError, match=r"2 optimizer steps in a row, steps 1–2 \(step 1: loss nan"):
        guard.check()  # the host read, at the check interval


def run_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fused", ["true", "false"])
def test_a_diverging_run_stops_in_one_line_and_no_checkpoint_holds_nan(fused, corpus, tmp_path):
    """The issue's command (lr 1e12: the loss is NaN from step 1) with a validation at step 2 and K = 4."""
    result = call_main("diffuse.train", *tiny_args(corpus, tmp_path, "optim.lr=1e12", "optim.warmup_steps=0",
                                                   "trainer.max_steps=20", "trainer.val_check_interval=2",
                                                   f"optim.fused={fused}", "callbacks.nonfinite_guard.max_consecutive=4"))
    assert result.returncode == 2, result
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "4 optimizer steps in a row, steps 1–4 (step 1: loss nan" in lines[0], lines
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["last.ckpt"]  # best.ckpt: val/nelbo was NaN at step 2, never recorded
    for path in ckpts:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 4 and ckpt["callbacks"]["NonFiniteGuard"]["consecutive"] == 3  # before the trip
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    skipped = {int(r["step"]): float(r["train/skipped_steps"]) for r in run_rows(tmp_path) if r.get("train/skipped_steps")}
    assert skipped[0] == 0 and skipped[1] == 1 and skipped[2] == 2  # counted in the logs


def test_non_finite_weights_are_never_written():
    check_finite_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(2), "n": torch.tensor([1, 2])}})
    with pytest.raises(DiffuseError, match=r"step 3: non-finite weights in state_dict\['b'\] and 1 more"):
        check_finite_checkpoint({"global_step": 3, "state_dict": {"a": torch.ones(2), "b": torch.tensor([math.inf]),
                                                                  "c": torch.tensor([math.nan])}})
    with pytest.raises(DiffuseError, match=r"current_model_state\['w'\]"):  # EMA's raw weights too
        check_finite_checkpoint({"state_dict": {"w": torch.ones(1)}, "current_model_state": {"w": torch.tensor([math.nan])}})

    from conftest import SPECIAL
    from diffuse.run.module import DiffusionLM
    from diffuse.registry import OBJECTIVES
    from diffuse.schedules import build_schedule

    objective = OBJECTIVES.build({"name": "masked_discrete"}, schedule=build_schedule("linear"), special=SPECIAL)
    module = DiffusionLM(tiny_transformer(), objective)
    state = module.state_dict()
    next(iter(state.values())).view(-1)[0] = math.nan
    with pytest.raises(DiffuseError, match="refusing to write a checkpoint"):
        module.on_save_checkpoint({"global_step": 0, "state_dict": state})


def test_best_checkpoint_never_records_a_non_finite_validation(tmp_path):
    best = FiniteModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/nelbo", mode="min", save_top_k=1)
    trainer = SimpleNamespace(global_step=5, strategy=SimpleNamespace(reduce_boolean_decision=lambda x: x))
    assert not best.check_monitor_top_k(trainer, torch.tensor(math.nan))
    assert not best.check_monitor_top_k(trainer, torch.tensor(math.inf))
    assert best.check_monitor_top_k(trainer, torch.tensor(3.0))  # fewer than save_top_k files: saved
    from lightning.pytorch.callbacks import ModelCheckpoint

    plain = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/nelbo", mode="min", save_top_k=1)
    assert best.state_key == plain.state_key  # resuming a run written with ModelCheckpoint keeps its best score


def test_fused_adamw_is_the_default_and_optimizers_without_a_fused_kernel_still_build():
    from test_config import compose_train

    from conftest import SPECIAL
    from diffuse.run.module import DiffusionLM
    from diffuse.registry import OBJECTIVES
    from diffuse.schedules import build_schedule

    def optimizer(optim):
        objective = OBJECTIVES.build({"name": "masked_discrete"}, schedule=build_schedule("linear"), special=SPECIAL)
        return DiffusionLM(tiny_transformer(), objective, optim=optim).configure_optimizers()["optimizer"]

    optim = dict(compose_train([]).optim)
    assert optim["fused"] is True and supports_found_inf(optimizer(optim))
    rms = optimizer({k: v for k, v in optim.items() if k != "betas"} | {"_target_": "torch.optim.RMSprop"})
    assert type(rms) is torch.optim.RMSprop and not supports_found_inf(rms)  # the host-sync fallback skips it
    assert not supports_found_inf(optimizer({**optim, "fused": False}))
