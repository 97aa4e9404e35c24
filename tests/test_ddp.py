"""Several processes: DDP(2) × b trains like 1 process × 2b (rows, noise, gradients, validation), resumes after
kill -9, and only global rank 0 writes the run's files; ddp_spawn is refused; the fsdp and SLURM presets compose.

The multi-process runs are the real entry point, `python -m diffuse.train trainer=ddp trainer.devices=2
trainer.accelerator=cpu` (gloo), whose second rank Lightning launches itself.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import OFFLINE, REPO, SPECIAL, call_main, error_lines, tiny_args
from diffuse.core.noise import SEED_STRIDE, batch_draw, noise_generator, shard_of
from diffuse.objectives.base import antithetic_uniform
from diffuse.registry import OBJECTIVES, REGULARIZERS
from diffuse.schedules import build_schedule

TESTS = Path(__file__).resolve().parent
STEPS = ["trainer.max_steps=6", "trainer.val_check_interval=3"]
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


class PauseAtStep(L.Callback):
    """Test helper, imported by the training processes through PYTHONPATH=tests: at the start of `step` rank 0
    writes `marker` and every rank sleeps, so the test can kill -9 them at a known point."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            if trainer.is_global_zero:
                self.marker.write_text(str(os.getpid()))
            time.sleep(600)


def even_corpus(path: Path, paragraphs: int = 300) -> Path:
    """Paragraphs of exactly 30 bytes: with the byte tokenizer and seq_len 32 every row is one document of 31
    loss tokens, so every rank's per-token mean has the same denominator (see the README on normalisation)."""
    import random

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]

    def paragraph():
        s = ""
        while len(s) < 29:
            s += rng.choice(words) + " "
        return s[:29] + "."

    path.write_text("\n\n".join(paragraph() for _ in range(paragraphs)))  # no trailing newline: 30 bytes each
    return path


def losses_by_step(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def assert_weights_close(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst:.3g}"


def ddp_cli(*args: str, timeout: int = 240, **popen) -> subprocess.Popen:
    env = {**os.environ, **OFFLINE, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "diffuse.train", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process × 8 rows for 6 steps; DDP(2) × 4 rows killed -9 during step 4 (after the step-3 checkpoint),
    then resumed to step 6 with resume=true in the same run dir."""
    root = tmp_path_factory.mktemp("ddp")
    corpus = even_corpus(root / "even.txt")
    one, ddp = root / "one", root / "ddp"
    out = {"one": one, "ddp": ddp, "timings": {}}

    start = time.perf_counter()
    result = call_main("diffuse.train", *tiny_args(corpus, one, *STEPS, "data.batch_size=8",
                                                   "callbacks.last_checkpoint.save_top_k=-1"))
    assert result.returncode == 0, result
    out["timings"]["one process"] = time.perf_counter() - start

    start = time.perf_counter()
    marker = root / "paused"
    proc = ddp_cli(*tiny_args(corpus, ddp, *STEPS, *DDP, "data.batch_size=4",
                              "+callbacks.pause._target_=test_ddp.PauseAtStep", "+callbacks.pause.step=4",
                              f"+callbacks.pause.marker={marker}"), start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, f"the DDP run ended before step 4:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the DDP run did not reach step 4 in 180 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # both ranks (the session Lightning's child shares)
        proc.wait(timeout=30)
    out["killed_log"] = proc.stdout.read()
    out["at_kill"] = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    out["timings"]["DDP until kill -9"] = time.perf_counter() - start

    start = time.perf_counter()
    proc = ddp_cli(*tiny_args(corpus, ddp, *STEPS, *DDP, "data.batch_size=4", "resume=true"), start_new_session=True)
    try:
        out["resumed_log"], _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out["resumed_rc"] = proc.returncode
    out["timings"]["DDP resume"] = time.perf_counter() - start
    print(out["timings"])
    return out


def test_ddp_two_ranks_train_like_one_process_with_twice_the_batch(runs):
    """Same rows, same noise, same gradient: the weights after 3 steps, the loss at every step after the resume,
    the final weights and the final (rank-reduced) val/nelbo agree with one process × 2b within float32 noise."""
    assert runs["resumed_rc"] == 0, runs["resumed_log"][-4000:]
    one, ddp = runs["one"], runs["ddp"]
    assert runs["at_kill"]["global_step"] == 3
    assert_weights_close(runs["at_kill"]["state_dict"], weights(next((one / "checkpoints").glob("*step=3.ckpt"))))
    a, b = losses_by_step(one), losses_by_step(ddp)
    assert sorted(a) == list(range(6)) and {3, 4, 5} <= set(b), (a, b)
    for step in (3, 4, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
    assert_weights_close(weights(ddp / "checkpoints" / "last.ckpt"), weights(one / "checkpoints" / "last.ckpt"))
    m_one, m_ddp = (json.loads((d / "metrics.json").read_text()) for d in (one, ddp))
    # one process validates batches 0 and 1; the ranks validate one each and sum their NELBO states
    assert m_ddp["val/nelbo"] == pytest.approx(m_one["val/nelbo"], rel=1e-5), (m_one, m_ddp)
    assert m_ddp["val/accuracy"] == pytest.approx(m_one["val/accuracy"], abs=1e-6)
    assert m_ddp["train/loss"] == pytest.approx(m_one["train/loss"], rel=1e-5)  # the ranks' mean, not rank 0's


def test_ddp_resumes_after_kill_9_and_only_rank_0_writes(runs):
    """Rank 1 writes only its own Hydra log (train_ddp_process_1.log); the checkpoint keeps the optimizer."""
    assert runs["resumed_rc"] == 0, runs["resumed_log"][-4000:]
    ddp = runs["ddp"]
    ckpt = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["optimizer_states"], "the final save lost the training state"
    metrics = json.loads((ddp / "metrics.json").read_text())  # valid JSON, written once
    for key in ("val/nelbo", "val/bpt", "train/loss", "train/tokens_per_sec"):
        assert metrics.get(key) is not None and math.isfinite(metrics[key]), (key, metrics)
    assert runs["resumed_log"].count("done at step 6") == 1, runs["resumed_log"][-3000:]  # rank 0 alone reports
    assert "Traceback" not in runs["resumed_log"] + (ddp / "train_ddp_process_1.log").read_text()
    left = sorted(p.name for p in ddp.rglob("*") if p.is_file() and not p.is_relative_to(ddp / ".hydra"))
    assert not [n for n in left if n.endswith(".tmp")], left
    assert set(left) <= {"metrics.json", "metrics.csv", "train.log", "train_ddp_process_1.log", ".lock",
                         "last.ckpt", "best.ckpt"}, left


def test_ddp_spawn_is_refused_in_one_line(corpus, tmp_path):
    for strategy in (["trainer.strategy=ddp_spawn"], ["trainer.strategy.start_method=spawn"]):
        result = call_main("diffuse.train", *tiny_args(corpus, tmp_path / strategy[0][-5:], *DDP, *strategy))
        assert result.returncode != 0
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and "ddp_spawn" in lines[0] and "trainer=ddp" in lines[0], result.stderr[-2000:]
        assert not (tmp_path / strategy[0][-5:] / "checkpoints").exists()


# -- the noise, without processes: a rank's draws are its rows of the global batch's --------------------------
def objectives():
    schedule = build_schedule("linear")
    return {name: OBJECTIVES.build({"name": name}, schedule=schedule, special=SPECIAL)
            for name in ("masked_discrete", "llada", "continuous")}


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_draws_its_rows_of_the_global_batch(world):
    b, L, stream = 4, 16, 7
    ids = torch.randint(0, 36, (world * b, L), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = SPECIAL.bos
    batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids)}
    regularizer = REGULARIZERS.build({"name": "cdlm_consistency", "delta_min": 2, "delta_max": 50})
    for name, obj in objectives().items():
        def draws(rows, generator):
            ids = rows["input_ids"]
            t = obj.sample_t(ids, generator, train=True)
            x0 = ids.unsqueeze(-1).expand(*ids.shape, 3).float() if name == "continuous" else ids  # embeddings
            noise = obj.draw_noise(x0, generator)
            delta = batch_draw(partial(torch.randint, 2, 51), (ids.shape[0], 1), generator)
            return t, noise, delta

        full = draws(batch, noise_generator(3, stream, "cpu"))
        for rank in range(world):
            gen = noise_generator(3, stream, "cpu", rank=rank, world_size=world)
            assert shard_of(gen) == (rank, world)
            rows = {k: v[rank::world] for k, v in batch.items()}  # the sampler's interleaving
            for mine, everyone in zip(draws(rows, gen), full):
                assert torch.equal(mine, everyone[rank::world]), (name, rank)
        # the consistency regularizer's coupled corruptions (t, δ and noise from the same generator)
        if name != "continuous":
            _, whole = regularizer.coupled_pair(obj, None, batch, noise_generator(3, stream, "cpu"))
            for rank in range(world):
                rows = {k: v[rank::world] for k, v in batch.items()}
                _, mine = regularizer.coupled_pair(obj, None, rows, noise_generator(3, stream, "cpu", rank, world))
                assert torch.equal(mine.z_early, whole.z_early[rank::world]), (name, rank)
                assert torch.equal(mine.z_late, whole.z_late[rank::world]), (name, rank)


def test_one_process_draws_are_unchanged():
    """World size 1 is a plain generator and the draws are the formulas of before ranks existed, bit for bit."""
    gen = noise_generator(5, 11, "cpu")
    assert type(gen) is torch.Generator
    old = torch.Generator().manual_seed(5 * SEED_STRIDE + 11)
    u0 = torch.rand((1, 1), generator=old)
    expected = (u0 + torch.arange(8, dtype=u0.dtype).view(8, 1) / 8) % 1.0
    assert torch.equal(antithetic_uniform(8, "cpu", gen, (1,)), expected)
    x0 = torch.zeros(8, 16, dtype=torch.long)
    obj = objectives()["masked_discrete"]
    assert torch.equal(obj.draw_noise(x0, gen), torch.rand(x0.shape, generator=old))


def test_training_step_of_one_process_uses_the_plain_stream(corpus):
    """DiffusionLM.training_step without ranks: the loss of the documented stream, bit for bit."""
    from diffuse.models.transformer import Transformer
    from diffuse.run.module import DiffusionLM
    from diffuse.core.noise import training_stream

    torch.manual_seed(0)
    backbone = Transformer(vocab_size=40, d_model=32, n_layers=1, n_heads=2)
    obj = objectives()["masked_discrete"]
    module = DiffusionLM(backbone, obj, seed=2)
    ids = torch.randint(0, 36, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids)}
    module.log_dict = lambda *a, **k: None  # no trainer attached
    loss = module.training_step(batch, 0)
    gen = torch.Generator().manual_seed(2 * SEED_STRIDE + training_stream(0, 0, 1))
    assert torch.equal(loss, obj.loss(backbone, batch, gen, train=True).loss)


# -- presets ------------------------------------------------------------------------------------------------
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from diffuse.core.paths import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


def test_fsdp_preset_composes_and_needs_a_gpu():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose(["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert wrap(module=torch.nn.Linear(2, 2), recurse=False, nonwrapped_numel=2_000_000)
    assert not wrap(module=torch.nn.Linear(2, 2), recurse=False, nonwrapped_numel=1_000)
    with pytest.raises(Exception, match="requires a GPU"):  # Lightning's FSDP does not run on CPU (README)
        instantiate(cfg.trainer, accelerator="cpu", devices=2, logger=False)


def test_submitit_slurm_preset_follows_the_trainer(tmp_path, monkeypatch):
    """`-m hydra/launcher=submitit_slurm`: the plugin's launcher, one task per device on each node, and the
    sbatch script submitit would submit (a stub `srun` stands in for a cluster; nothing is submitted)."""
    import warnings

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Hydra's note that the file is checked against the plugin's schema
        cfg = compose(["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                       "hydra.launcher.partition=gpu"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    instantiate(cfg.hydra.launcher)

    import submitit

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    params = {k: v for k, v in launcher.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
            "stderr_to_stdout"}  # as the launcher passes them (others get the slurm_ prefix)
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit", slurm_max_num_timeout=0)
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m diffuse.train", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu"):
        assert f"#SBATCH {line}" in script, script
