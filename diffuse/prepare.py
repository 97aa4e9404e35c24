"""`python -m diffuse.prepare [the overrides of diffuse.train]` — write the prepared-data cache (tokenized,
packed rows, diffuse/data/prepared.py) that `diffuse.train` with the same overrides memory-maps, and print
where it is. Run it once before a multi-process run or a sweep so no job waits on tokenization.

The `train` config is composed (Hydra's compose API) rather than run: preparing makes no run dir.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import DiffuseError, one_line_errors
from diffuse.run import rundir
from diffuse.run.build import build_datamodule
from diffuse.run.checkpoint import checkpoint_tokenizer, read_checkpoint


def compose_train(overrides: list[str]):
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        raise DiffuseError(str(err).splitlines()[0]) from None


def run_tokenizer(cfg):
    """The tokenizer diffuse.train would use: a resumed or initialised run's checkpoint's, else None (built)."""
    if cfg.get("ckpt_path") or cfg.get("resume"):
        path, key = rundir.resume_path(cfg, Path(cfg.hydra.run.dir)), "ckpt_path"
    elif cfg.get("init_from"):
        path, key = cfg.init_from, "init_from"
    else:
        return None
    return checkpoint_tokenizer(read_checkpoint(str(path), key, mmap=True), path)


def prepare(overrides: list[str]) -> dict[str, Path]:
    cfg = compose_train(overrides)
    dm = build_datamodule(cfg, seed=cfg.seed, cache_dir=cfg.paths.cache_dir)
    if not dm.prepared:
        raise DiffuseError("data.prepared=false: nothing to prepare (drop the override)")
    dm.load(run_tokenizer(cfg))
    dm.setup("fit")
    for split, rows in dm.splits.items():
        size = sum(f.stat().st_size for f in rows.folder.iterdir())
        print(f"{split}: {rows.folder} ({rows.meta['rows']} rows of {dm.seq_len} tokens, {size / 1e6:.1f} MB)")
    return {split: rows.folder for split, rows in dm.splits.items()}


@one_line_errors
def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__.strip())
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    prepare(sys.argv[1:])


if __name__ == "__main__":
    main()
