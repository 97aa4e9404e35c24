"""DiffusionLM: the one LightningModule. It owns a backbone, an objective and a list of
regularizers, and never asks which ones they are."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from diffuse.core.metrics import NELBO, CorruptionAccuracy
from diffuse.core.noise import noise_generator, training_stream, validation_stream
from diffuse.data.tokenizers import tokenizer_state
from diffuse.run.callbacks.ema import resume_without_ema
from diffuse.run.callbacks.guard import check_finite_checkpoint
from diffuse.run.optim import build_optimizer


class DiffusionLM(L.LightningModule):
    def __init__(self, backbone, objective, regularizers=(), optim: dict | None = None, seed: int = 0,
                 sampler=None, tokenizer=None, run_config: dict | None = None, distiller=None):
        super().__init__()
        self.backbone = backbone
        self.objective = objective  # an nn.Module: its own networks and buffers move and save with this one
        self.regularizers = nn.ModuleList(regularizers)
        self.distiller = distiller  # diffuse.distill: its loss replaces the objective's in training (no state)
        self.optim = dict(optim or {})
        self.seed = seed
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.run_config = run_config or {}  # stored in checkpoints so a run can be rebuilt from one file
        self.val_nelbo = NELBO()
        self.val_accuracy = CorruptionAccuracy()
        self.last_val_step = -1

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        rank, world = self._rank_and_world()
        # every rank seeds the same stream and keeps its rows of the global batch's draws (diffuse/core/noise.py)
        gen = noise_generator(self.seed, training_stream(self.global_step, batch_idx, accumulate), self.device,
                              rank=rank, world_size=world)
        for component in (self.objective, *self.regularizers, self.backbone):  # curricula and annealing read it
            component.global_step = self.global_step
        if self.distiller is not None:
            out = self.distiller.loss(self.objective, self.backbone, batch, gen)
        else:
            out = self.objective.loss(self.backbone, batch, gen, train=True)
        total = out.loss
        logs = {"train/objective_loss": out.loss, **{f"train/{k}": v for k, v in out.metrics.items()}}
        for i, reg in enumerate(self.regularizers):
            reg_loss, reg_logs = reg(self.objective, self.backbone, batch, gen)
            total = total + reg_loss
            for k, v in reg_logs.items():  # two regularizers logging one name: the later ones get their index
                logs[f"train/{k}" if f"train/{k}" not in logs else f"train/{k}_{i}"] = v
        if out.token_correct is not None and (out.token_correct.numel() or world > 1):  # ranks log the same keys
            logs["train/accuracy"] = out.token_correct.mean()
            logs["train/confidence"] = out.token_confidence.mean()
        logs["train/loss"] = total
        if world > 1:  # log what one process over the global batch would (one small all-reduce a step)
            logs = self._mean_over_ranks(logs, out)
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        return total

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)

    def _mean_over_ranks(self, logs: dict, out) -> dict:
        """The logged values over all ranks, in one all-reduce: the mean over ranks (the loss's is what DDP's
        averaged gradient descends), accuracy and confidence over all predicted tokens."""
        names = list(logs)
        sums = [torch.as_tensor(logs[k], device=self.device).detach().float().reshape(()) for k in names]
        weights = torch.ones(len(names), device=self.device)  # filled on the device: no host copy, no sync
        if "train/accuracy" in logs:  # token-weighted: a rank may have no predicted token (its mean is NaN)
            for key, per_token in (("train/accuracy", out.token_correct), ("train/confidence", out.token_confidence)):
                i = names.index(key)
                sums[i], weights[i] = per_token.detach().float().sum(), per_token.numel()
        total = self.trainer.strategy.reduce(torch.stack([torch.stack(sums), weights]), reduce_op="sum")
        return dict(zip(names, (total[0] / total[1]).unbind()))

    def validation_step(self, batch, batch_idx):
        # a fixed noise stream per validation batch: val/nelbo is comparable across evaluations. With W ranks,
        # this rank's batch batch_idx is the global batch batch_idx·W + rank (TextDataModule.val_dataloader)
        rank, world = self._rank_and_world()
        gen = noise_generator(self.seed, validation_stream(batch_idx * world + rank), self.device)
        out = self.objective.loss(self.backbone, batch, gen, train=False)
        self.val_nelbo.update(out.nll_sum, out.n_tokens)
        if out.token_correct is not None:
            self.val_accuracy.update(out.token_correct, out.token_confidence, out.token_level)

    def on_validation_epoch_end(self):
        values = {f"val/{k}": v for k, v in self.val_nelbo.compute().items()}
        values.update({f"val/{k}": v for k, v in self.val_accuracy.compute().items()})
        shown = {"val/nelbo", "val/bpt"}
        # compute() already summed the metric states over the ranks (torchmetrics syncs on compute), so every
        # rank holds the global value; sync_dist only averages those identical copies (and tells Lightning so)
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True, sync_dist=True)
        self.log_dict({k: v for k, v in values.items() if k not in shown}, sync_dist=True)
        self.val_nelbo.reset()
        self.val_accuracy.reset()
        self.last_val_step = self.global_step

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        optim = dict(self.optim)
        if self._trainer is not None and self.trainer.gradient_clip_val and self._loss_scaler() is not None:
            optim["fused"] = False  # a fused step unscales inside the kernel: clipping must see unscaled gradients
        opt, sched = build_optimizer(self.named_parameters(), optim)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning refuses to clip a fused optimizer's gradients under any mixed precision (it assumes a loss
        scaler); bf16 has none, so the gradients are at their true scale and are clipped here."""
        if gradient_clip_val and self._loss_scaler() is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _loss_scaler(self):
        """torch.amp.GradScaler of 16-mixed precision; None otherwise (bf16, 32)."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    # -- checkpoints carry what is needed to rebuild the run --------------------------------------
    def on_save_checkpoint(self, checkpoint):
        check_finite_checkpoint(checkpoint)  # runs after the callbacks' hooks (EMA): never write non-finite weights
        checkpoint["diffuse"] = {
            "config": self.run_config,
            "tokenizer": tokenizer_state(self.tokenizer) if self.tokenizer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint):
        resume_without_ema(self._trainer, checkpoint)  # an EMA checkpoint resumed without EMA: the raw weights

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], length: int, seed: int = 0, sampler=None):
        sampler = sampler or self.sampler
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return sampler.generate(self.backbone, self.objective, prompts, length, seed=seed)
        finally:
            self.backbone.train(was_training)
