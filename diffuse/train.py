"""`python -m diffuse.train [group=option ...] [key=value ...]` — train one model (or a sweep with -m).

Thin on purpose: compose the config, build the pieces through the registries, hand them to one
`lightning.Trainer`, write metrics.json, print a few samples.
"""

from __future__ import annotations

import logging
import math
import subprocess
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from omegaconf import DictConfig, OmegaConf

from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import DiffuseError, one_line_errors
from diffuse.evaluation import readable
from diffuse.run import rundir
from diffuse.run.build import build_datamodule, build_module
from diffuse.run.callbacks.throughput import (
    Throughput,
    flat_metrics,
    write_metrics_json,
)
from diffuse.run.checkpoint import (
    AtomicCheckpointIO,
    checkpoint_tokenizer,
    read_checkpoint,
    stored_config,
)
from diffuse.run.load import check_checkpoint_fits, load_weights

log = logging.getLogger("diffuse")


def refuse_spawned_ranks(trainer: L.Trainer) -> None:
    """ddp_spawn / ddp_fork / ddp_notebook run fit() in workers and hand back only the weights: this process's
    trainer never sees their steps, loops, optimizer or metrics (it would validate and save a step-0 state)."""
    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
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


@one_line_errors
def train(cfg: DictConfig) -> dict:
    return train_in(cfg, Path(HydraConfig.get().runtime.output_dir))


def train_in(cfg: DictConfig, run_dir: Path) -> dict:
    """One training run into `run_dir` (diffuse.distill calls it once per round)."""
    # one writer per run dir (usually locked already by the RunDirLock Hydra callback, before .hydra/)
    owns_lock = rundir.acquire(run_dir) if rundir.is_global_rank_zero() else False
    try:
        return _train(cfg, run_dir)
    finally:
        if owns_lock:
            rundir.release(run_dir)


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if rundir.is_global_rank_zero():
        rundir.clean_temp_files(run_dir)

    ckpt_path = rundir.resume_path(cfg, run_dir)
    ckpt, ckpt_tokenizer, resumed_at, extra_callbacks = None, None, None, []
    if ckpt_path:  # keep the checkpoint's tokenizer: a resumed run must see the same vocabulary
        ckpt = read_checkpoint(ckpt_path, "ckpt_path")
        ckpt_tokenizer = checkpoint_tokenizer(ckpt, ckpt_path)
        resumed_at = int(ckpt.get("global_step", 0))
        changes = rundir.optim_changes(stored_config(ckpt).get("optim") or {}, run_config.get("optim") or {})
        rundir.announce_optim_changes(changes)
        extra_callbacks = [rundir.ApplyOptimConfig(changes)] if changes else []

    init = None
    if cfg.get("init_from") and not ckpt_path:  # a fresh run starting from another run's weights (a student)
        init = read_checkpoint(cfg.init_from, "init_from")
        ckpt_tokenizer = checkpoint_tokenizer(init, cfg.init_from)

    dm = build_datamodule(cfg, seed=cfg.seed, cache_dir=cfg.paths.cache_dir)
    log.info("[1/3] tokenize: %s, tokenizer=%s", cfg.data.get("name"), cfg.tokenizer.get("name"))
    tokenizer = dm.load(ckpt_tokenizer)
    module = build_module(cfg, tokenizer, run_config=run_config)
    if ckpt_path:
        check_checkpoint_fits(module, ckpt, ckpt_path)
    if init is not None:
        load_weights(module, init, cfg.init_from)
        del init
    dm.setup("fit")
    n_params = sum(p.numel() for p in module.backbone.parameters())
    log.info("data: %s; model: %.2fM parameters; run dir: %s", dm.describe(), n_params / 1e6, run_dir)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c] + extra_callbacks
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if resumed_at is not None and rundir.is_global_rank_zero():
        for logger in loggers:  # steps after the checkpoint are logged again by this run: keep each once
            if hasattr(logger, "forget_steps_from"):
                logger.forget_steps_from(resumed_at)
    # the checkpoint already read goes to Lightning's resume (optimizer, loops, callbacks): the file is read once
    checkpoint_io = AtomicCheckpointIO(preloaded={ckpt_path: ckpt} if ckpt_path else None)
    del ckpt  # held by checkpoint_io until Lightning takes it, then freed
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[checkpoint_io], default_root_dir=str(run_dir))
    refuse_spawned_ranks(trainer)
    dm.accumulate = trainer.accumulate_grad_batches
    log.info("[2/3] train: %d steps of %d rows × %d tokens", trainer.max_steps, dm.batch_size, dm.seq_len)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)

    fit_metrics = dict(trainer.callback_metrics)  # validate() below starts a fresh set: keep train/*
    if module.last_val_step != trainer.global_step:  # metrics.json reports the final weights
        trainer.validate(module, datamodule=dm, verbose=False)
    last = run_dir / "checkpoints" / "last.ckpt"
    # the full final state (optimizer too), whatever the checkpoint interval; every rank calls it, rank 0 writes
    trainer.save_checkpoint(str(last), weights_only=False)

    metrics = {**fit_metrics, **trainer.callback_metrics}
    speed = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    if speed is not None and math.isfinite(speed.average):  # NaN: no step trained (a finished run resumed)
        metrics["train/tokens_per_sec"] = speed.average
    if not trainer.is_global_zero:  # files, the log line and samples are rank 0's; the values are the same on every rank
        return flat_metrics(metrics)
    if resumed_at is not None:  # what this run did not measure again stays as the earlier run wrote it
        metrics = rundir.merge_metrics(run_dir / "metrics.json", metrics)
    flat = write_metrics_json(run_dir / "metrics.json", metrics)
    summary = ", ".join(f"{k}={flat[k]:.4g}" for k in ("val/nelbo", "val/bpt", "train/loss", "train/tokens_per_sec")
                        if flat.get(k) is not None)
    log.info("done at step %d: %s", trainer.global_step, summary)

    if cfg.get("num_samples", 0) > 0:
        print_samples(cfg, module, tokenizer, dm, flat, run_dir)
    wait_for_other_ranks(trainer)
    return flat


CORPUS_DOCS = 100_000  # training documents whose words the end-of-run readability check counts as known


def print_samples(cfg: DictConfig, module, tokenizer, dm, flat: dict, run_dir: Path) -> None:
    """The samples, how they read (diffuse/evaluation/readable.py), val/bpt, the run dir and what to try next."""
    sampler = module.sampler
    steps = f", {sampler.steps} steps" if getattr(sampler, "steps", None) else ""
    log.info("[3/3] sample: %d × %d tokens, sampler=%s%s", cfg.num_samples, cfg.sample_length,
             sampler.registry_name, steps)
    out = module.generate([[] for _ in range(cfg.num_samples)], cfg.sample_length, seed=cfg.seed)
    rows = [row[:n] for row, n in zip(out.tokens.tolist(), out.lengths.tolist())]
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    for i, (row, text) in enumerate(zip(rows, texts)):
        print(f"--- sample {i} ({len(row)} tokens, {out.nfe} forward passes) ---\n{text}")
    special = set(tokenizer.all_special_ids)
    real = [t for text in dm.documents("validation", 2000)
            for t in tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]]
    # the training text's words: at most CORPUS_DOCS documents (the embedded corpus has ~2.5k), so the end of a
    # run on a large corpus does not pull all of its text into memory
    vocabulary = readable.corpus_words(dm.documents("train", CORPUS_DOCS))
    metrics = readable.word_metrics(texts, vocabulary)
    metrics["entropy"], metrics["real_entropy"] = readable.matched_entropy(
        [[t for t in row if t not in special] for row in rows], real)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    bpt = flat.get("val/bpt")
    print(f"---\nsamples: {readable.describe(metrics)}\n"
          f"val/bpt: {'n/a' if bpt is None else f'{bpt:.3f}'} (bits per token on held-out text; lower is better)\n"
          f"run dir: {run_dir}\n"
          "next:\n"
          f'  python -m diffuse.sample ckpt={ckpt} prompt="The for statement" num_samples=2\n'
          f"  python -m diffuse.evaluate ckpt={ckpt}\n"
          "  python -m diffuse.train recipe=tdlm        # a 7M-parameter recipe (TDLM); README lists the others")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    flat = train(cfg)
    return flat.get(cfg.get("optimized_metric") or "val/nelbo")  # for sweepers (Optuna)


if __name__ == "__main__":
    main()
