"""DiffusionLM: the one LightningModule. It owns a backbone, an objective and a list of
regularizers, and never asks which ones they are."""

from __future__ import annotations

import math

import lightning as L
import torch

from diffuse.metrics import NELBO, CorruptionAccuracy


class DiffusionLM(L.LightningModule):
    def __init__(self, backbone, objective, regularizers=(), optim: dict | None = None, seed: int = 0,
                 sampler=None, tokenizer=None, run_config: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.objective = objective
        self.regularizers = list(regularizers)
        self.optim = dict(optim or {})
        self.seed = seed
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.run_config = run_config or {}  # stored in checkpoints so a run can be rebuilt from one file
        self.val_nelbo = NELBO()
        self.val_accuracy = CorruptionAccuracy()
        self.last_val_step = -1

    # -- steps ----------------------------------------------------------------------------------
    def _generator(self, stream: int) -> torch.Generator:
        # noise is a function of (seed, step): a resumed run draws exactly what an uninterrupted one would
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + stream)

    def training_step(self, batch, batch_idx):
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        gen = self._generator(self.global_step * accumulate + batch_idx % accumulate)
        out = self.objective.loss(self.backbone, batch, gen, train=True)
        total = out.loss
        logs = {"train/objective_loss": out.loss, **{f"train/{k}": v for k, v in out.metrics.items()}}
        for reg in self.regularizers:
            reg_loss, reg_logs = reg(self.objective, self.backbone, batch, gen)
            total = total + reg_loss
            logs.update({f"train/{k}": v for k, v in reg_logs.items()})
        if out.token_correct is not None and out.token_correct.numel():
            logs["train/accuracy"] = out.token_correct.mean()
            logs["train/confidence"] = out.token_confidence.mean()
        logs["train/loss"] = total
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        return total

    def validation_step(self, batch, batch_idx):
        # a fixed noise stream per validation batch: val/nelbo is comparable across evaluations
        out = self.objective.loss(self.backbone, batch, self._generator(-1 - batch_idx), train=False)
        self.val_nelbo.update(out.nll_sum, out.n_tokens)
        if out.token_correct is not None:
            self.val_accuracy.update(out.token_correct, out.token_confidence, out.token_level)

    def on_validation_epoch_end(self):
        values = {f"val/{k}": v for k, v in self.val_nelbo.compute().items()}
        values.update({f"val/{k}": v for k, v in self.val_accuracy.compute().items()})
        shown = {"val/nelbo", "val/bpt"}
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True)
        self.log_dict({k: v for k, v in values.items() if k not in shown})
        self.val_nelbo.reset()
        self.val_accuracy.reset()
        self.last_val_step = self.global_step

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.get("weight_decay", 0.0)}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.get("lr", 3e-4), betas=tuple(o.get("betas", (0.9, 0.98))), eps=o.get("eps", 1e-8),
        )
        warmup, total = int(o.get("warmup_steps", 0)), int(o.get("total_steps") or 0)
        min_ratio = float(o.get("min_lr_ratio", 0.1))

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if total <= warmup:
                return 1.0
            progress = min(1.0, (step - warmup) / (total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints carry what is needed to rebuild the run --------------------------------------
    def on_save_checkpoint(self, checkpoint):
        from diffuse.data.tokenizers import tokenizer_state

        checkpoint["diffuse"] = {
            "config": self.run_config,
            "tokenizer": tokenizer_state(self.tokenizer) if self.tokenizer is not None else None,
        }

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
