"""One training run into a run directory, as a list of named steps: where it starts from (a checkpoint to
resume, another run's weights, or nothing), the data and the module, one `lightning.Trainer`, the fit, and
what the run leaves behind (the final checkpoint and metrics.json). `python -m diffuse.train` and each round
of `python -m diffuse.distill` call `train_in`."""

from __future__ import annotations

import logging
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from omegaconf import DictConfig, OmegaConf

from diffuse.core.ranks import is_global_rank_zero
from diffuse.errors import DiffuseError
from diffuse.run import rundir
from diffuse.run.build import build_datamodule, build_module
from diffuse.run.callbacks.apply_optim import ApplyOptimConfig
from diffuse.run.callbacks.throughput import Throughput
from diffuse.run.checkpoint import (
    AtomicCheckpointIO,
    checkpoint_tokenizer,
    read_checkpoint,
    stored_config,
)
from diffuse.run.entry import named_on_command_line
from diffuse.run.load import check_checkpoint_fits, load_weights
from diffuse.run.optim import announce_optim_changes, optim_changes

log = logging.getLogger("diffuse")

# after a run, on global rank 0: (cfg, module, tokenizer, datamodule, flat metrics, run dir)
Report = Callable[[DictConfig, L.LightningModule, object, L.LightningDataModule, dict, Path], None]


@dataclass
class Start:
    """Where a run starts from. `ckpt`: the resumed checkpoint, read once and handed to Lightning; `init`:
    another run's checkpoint whose weights (only) start this one; `tokenizer`: theirs, when either is given."""

    ckpt_path: str | None = None
    ckpt: dict | None = None
    resumed_at: int | None = None
    init: dict | None = None
    tokenizer: object = None
    callbacks: list = field(default_factory=list)


def train_in(cfg: DictConfig, run_dir: Path, report: Report | None = None) -> dict:
    """One training run into `run_dir`; its flat metrics. `report` runs at the end on global rank 0."""
    # one writer per run dir (usually locked already by the RunDirLock Hydra callback, before .hydra/)
    owns_lock = rundir.acquire(run_dir) if is_global_rank_zero() else False
    try:
        return _train(cfg, run_dir, report)
    finally:
        if owns_lock:
            rundir.release(run_dir)


def _train(cfg: DictConfig, run_dir: Path, report: Report | None) -> dict:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if is_global_rank_zero():
        rundir.clean_temp_files(run_dir)
    start = starting_point(cfg, run_dir, run_config)
    dm = build_datamodule(cfg, seed=cfg.seed, cache_dir=cfg.paths.cache_dir)
    log.info("[1/3] tokenize: %s, tokenizer=%s", cfg.data.get("name"), cfg.tokenizer.get("name"))
    tokenizer = dm.load(start.tokenizer)
    module = module_from(cfg, tokenizer, run_config, start)
    dm.setup("fit")
    n_params = sum(p.numel() for p in module.backbone.parameters())
    log.info("data: %s; model: %.2fM parameters; run dir: %s", dm.describe(), n_params / 1e6, run_dir)

    trainer = make_trainer(cfg, run_dir, start)
    dm.accumulate = trainer.accumulate_grad_batches
    log.info("[2/3] train: %d steps of %d rows × %d tokens", trainer.max_steps, dm.batch_size, dm.seq_len)
    trainer.fit(module, datamodule=dm, ckpt_path=start.ckpt_path)
    metrics = finish(trainer, module, dm, run_dir)
    if not trainer.is_global_zero:  # files, the log line and samples are rank 0's; the values are the same on every rank
        return rundir.flat_metrics(metrics)

    flat = write_metrics(run_dir, metrics, resumed=start.resumed_at is not None, step=trainer.global_step)
    if report is not None:
        report(cfg, module, tokenizer, dm, flat, run_dir)
    wait_for_other_ranks(trainer)
    return flat


def starting_point(cfg: DictConfig, run_dir: Path, run_config: dict) -> Start:
    """A resume (`resume=true` / `ckpt_path=`) keeps the checkpoint's tokenizer and says which optim keys
    changed; `init_from` (a fresh run from another run's weights, e.g. a student) keeps its tokenizer."""
    rundir.check_new_run(cfg, run_dir)  # a new run over a finished one: refused unless overwrite=true
    ckpt_path = rundir.resume_path(cfg, run_dir)
    if ckpt_path:
        ckpt = read_checkpoint(ckpt_path, "ckpt_path")
        keep_tokenizer_of(ckpt, "ckpt_path", run_config)
        changes = optim_changes(stored_config(ckpt).get("optim") or {}, run_config.get("optim") or {})
        announce_optim_changes(changes)
        return Start(ckpt_path=ckpt_path, ckpt=ckpt, resumed_at=int(ckpt.get("global_step", 0)),
                     tokenizer=checkpoint_tokenizer(ckpt, ckpt_path),
                     callbacks=[ApplyOptimConfig(changes)] if changes else [])
    if cfg.get("init_from"):
        init = read_checkpoint(cfg.init_from, "init_from")
        keep_tokenizer_of(init, "init_from", run_config)
        return Start(init=init, tokenizer=checkpoint_tokenizer(init, cfg.init_from))
    return Start()


def keep_tokenizer_of(ckpt: dict, key: str, run_config: dict) -> None:
    """A run started from a checkpoint (resume or init_from) uses its tokenizer: a `tokenizer…` override on the
    command line that contradicts it is refused in one line, and the run records the tokenizer it really uses."""
    theirs = stored_config(ckpt).get("tokenizer")
    if not theirs or theirs == run_config.get("tokenizer"):
        return
    if named_on_command_line("tokenizer"):
        raise DiffuseError(f"{key} was trained with tokenizer={theirs.get('name')} ({theirs}); a run started from it "
                           f"uses that tokenizer: drop the tokenizer override")
    run_config["tokenizer"] = theirs


def module_from(cfg: DictConfig, tokenizer, run_config: dict, start: Start):
    """The module the config builds, checked against the resumed checkpoint or loaded with `init_from`'s weights."""
    # a sampler a recipe or preset names for its own objective never blocks another objective's run
    origin = None if named_on_command_line("sampler") else "the config, not the command line"
    module = build_module(cfg, tokenizer, run_config=run_config, sampler_origin=origin)
    if start.ckpt_path:
        check_checkpoint_fits(module, start.ckpt, start.ckpt_path)
    if start.init is not None:
        load_weights(module, start.init, cfg.init_from)
        start.init = None
    return module


def make_trainer(cfg: DictConfig, run_dir: Path, start: Start) -> L.Trainer:
    """The one `lightning.Trainer`: configured callbacks and loggers, atomic checkpoint writes."""
    callbacks = [instantiated(c, f"callbacks.{k}") for k, c in (cfg.get("callbacks") or {}).items() if c]
    callbacks += start.callbacks
    loggers = [instantiated(c, f"logger.{k}") for k, c in (cfg.get("logger") or {}).items() if c]
    if start.resumed_at is not None and is_global_rank_zero():
        for logger in loggers:  # steps after the checkpoint are logged again by this run: keep each once
            if hasattr(logger, "forget_steps_from"):
                logger.forget_steps_from(start.resumed_at)
    # the checkpoint already read goes to Lightning's resume (optimizer, loops, callbacks): the file is read once
    checkpoint_io = AtomicCheckpointIO(preloaded={start.ckpt_path: start.ckpt} if start.ckpt_path else None)
    start.ckpt = None  # held by checkpoint_io until Lightning takes it, then freed
    accumulate = cfg.trainer.get("accumulate_grad_batches")
    if accumulate is not None and not (isinstance(accumulate, int) and accumulate >= 1):  # Lightning divides by it
        raise DiffuseError(f"trainer.accumulate_grad_batches={accumulate} must be an integer ≥ 1")
    trainer: L.Trainer = instantiated(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
                                      plugins=[checkpoint_io], default_root_dir=str(run_dir))
    refuse_spawned_ranks(trainer)
    return trainer


def instantiated(node, key: str, **kwargs):
    """Hydra's instantiate, with what the target refused (Lightning's own checks of trainer.*, a callback's of its
    keys) as one line naming the config node, instead of Hydra's multi-line "Error in call to target"."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, DiffuseError):
            raise cause from None
        raise DiffuseError(f"{key}: {' '.join(str(cause).split())}") from None


def finish(trainer: L.Trainer, module, dm, run_dir: Path) -> dict:
    """Validate the final weights (unless the last step just did), save the full final state, gather metrics."""
    fit_metrics = dict(trainer.callback_metrics)  # validate() below starts a fresh set: keep train/*
    if module.last_val_step != trainer.global_step:  # metrics.json reports the final weights
        trainer.validate(module, datamodule=dm, verbose=False)
    # the full final state (optimizer too), whatever the checkpoint interval; every rank calls it, rank 0 writes
    trainer.save_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"), weights_only=False)
    metrics = {**fit_metrics, **trainer.callback_metrics}
    speed = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    if speed is not None and math.isfinite(speed.average):  # NaN: no step trained (a finished run resumed)
        metrics["train/tokens_per_sec"] = speed.average
    return metrics


def write_metrics(run_dir: Path, metrics: dict, resumed: bool, step: int) -> dict:
    """metrics.json (flat) and the run's one summary line; a resumed run keeps what it did not measure again."""
    if resumed:
        metrics = rundir.merge_metrics(run_dir / "metrics.json", metrics)
    flat = rundir.write_metrics_json(run_dir / "metrics.json", metrics)
    summary = ", ".join(f"{k}={flat[k]:.4g}" for k in ("val/nelbo", "val/bpt", "train/loss", "train/tokens_per_sec")
                        if flat.get(k) is not None)
    log.info("done at step %d: %s", step, summary)
    return flat


def refuse_spawned_ranks(trainer: L.Trainer) -> None:
    """ddp_spawn / ddp_fork / ddp_notebook run fit() in workers and hand back only the weights: this process's
    trainer never sees their steps, loops, optimizer or metrics (it would validate and save a step-0 state)."""
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        raise DiffuseError("trainer.strategy: ddp_spawn, ddp_fork and ddp_notebook are not supported (the main "
                           "process never sees the workers' training state); use trainer=ddp")


def wait_for_other_ranks(trainer: L.Trainer, timeout: float = 300.0) -> None:
    """On the rank that Lightning's launcher started the others from: a rank that failed fails the run."""
    for local_rank, proc in enumerate(getattr(trainer.strategy.launcher, "procs", None) or [], start=1):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DiffuseError(f"local rank {local_rank} (pid {proc.pid}) did not exit {timeout:.0f} s after training")
        if code:
            raise DiffuseError(f"local rank {local_rank} (pid {proc.pid}) exited with code {code}; its log is "
                               f"train_ddp_process_{local_rank}.log in the run dir")
