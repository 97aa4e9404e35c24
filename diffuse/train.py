"""`python -m diffuse.train [group=option ...] [key=value ...]` — train one model (or a sweep with -m).

Thin on purpose: compose the config and hand it to `diffuse.run.fit.train_in` (the named steps of a run);
at the end, print a few samples and how they read.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import one_line_errors
from diffuse.evaluation.end_of_run import print_samples
from diffuse.run.entry import sampler_knobs
from diffuse.run.fit import train_in


@one_line_errors
def train(cfg: DictConfig) -> dict:
    return train_in(cfg, Path(HydraConfig.get().runtime.output_dir), report=print_samples)


@sampler_knobs
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    flat = train(cfg)
    return flat.get(cfg.get("optimized_metric") or "val/nelbo")  # for sweepers (Optuna)


if __name__ == "__main__":
    main()
