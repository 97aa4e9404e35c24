"""`callbacks.sample_every_n_steps`: watch the model learn to fill masks while it trains.

Every N steps, for a few validation sequences, the tail of each sequence is masked (the answer of
an SFT sample, else the last `mask_fraction` of its first document) and the configured sampler fills
it in, conditioned on the rest. Prints the Axolotl plugin's three lines per sequence:

    Original (n tokens): …
    Masked (k/n tokens, x%): … [MASK][MASK]…
    Generated: …

and logs them: a wandb Table when a WandbLogger is active, TensorBoard text when a TensorBoardLogger
is, and always rows of `samples.csv` in the run directory.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

COLUMNS = ["step", "index", "n_tokens", "n_masked", "nfe", "original", "masked", "generated"]


class SampleEveryNSteps(L.Callback):
    def __init__(self, every_n_steps: int = 100, num_sequences: int = 3, mask_fraction: float = 0.5,
                 max_tokens: int = 64, seed: int = 0, filename: str = "samples.csv"):
        self.every_n_steps, self.num_sequences = int(every_n_steps), int(num_sequences)
        self.mask_fraction, self.max_tokens, self.seed = float(mask_fraction), int(max_tokens), seed
        self.filename = filename
        self._examples: list[tuple[list[int], list[int]]] | None = None

    # -- which sequences: (prompt, hidden tail) pairs from the first validation batch -----------------
    def examples(self, trainer, special) -> list[tuple[list[int], list[int]]]:
        if self._examples is None:
            batch = next(iter(trainer.datamodule.val_dataloader()))
            self._examples = []
            for r in range(min(self.num_sequences, batch["input_ids"].shape[0])):
                first = (batch["segment_ids"][r] == 1).nonzero().flatten()
                ids = batch["input_ids"][r, first][: self.max_tokens].tolist()
                plain = [i for i in ids if i not in (special.bos, special.eos, special.pad)]
                if "prompt_mask" in batch:  # SFT: hide the answer
                    has_bos = int(ids[:1] == [special.bos])
                    n_prompt = int(batch["prompt_mask"][r, first][: self.max_tokens].sum()) - has_bos
                else:
                    n_prompt = len(plain) - max(1, math.ceil(self.mask_fraction * len(plain)))
                if len(plain) > n_prompt:
                    self._examples.append((plain[:n_prompt], plain[n_prompt:]))
        return self._examples

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero or step == 0 or step % self.every_n_steps:
            return
        tok = pl_module.tokenizer
        special = pl_module.objective.special
        rows = []
        for i, (prompt, tail) in enumerate(self.examples(trainer, special)):
            out = pl_module.generate([prompt], len(tail), seed=self.seed + i)
            generated = out.tokens[0, : int(out.lengths[0])].tolist()
            n, k = len(prompt) + len(tail), len(tail)
            rows.append([step, i, n, k, out.nfe, tok.decode(prompt + tail),
                         tok.decode(prompt) + tok.mask_token * k, tok.decode(prompt) + tok.decode(generated)])
            print(f"\n[step {step}] sample {i}\nOriginal ({n} tokens): {rows[-1][5]}\n"
                  f"Masked ({k}/{n} tokens, {100 * k / max(n, 1):.1f}%): {rows[-1][6]}\n"
                  f"Generated ({out.nfe} forward passes): {rows[-1][7]}")
        if rows:
            self.log_rows(trainer, rows)

    def log_rows(self, trainer, rows: list[list]):
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="samples", columns=COLUMNS, data=rows, step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                text = "\n\n".join(f"**{r[1]}** Original: {r[5]}  \nGenerated: {r[7]}" for r in rows)
                logger.experiment.add_text("samples", text, global_step=trainer.global_step)
        path = Path(trainer.default_root_dir) / self.filename
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(COLUMNS)
            writer.writerows(rows)

