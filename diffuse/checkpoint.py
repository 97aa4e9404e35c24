"""Checkpoints: written atomically, and enough on their own to rebuild a run (config + tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from diffuse.errors import DiffuseError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


def read_checkpoint(ckpt_path: str, key: str, map_location="cpu") -> dict:
    """torch.load, with a one-line error naming `key=path` when the file is missing or not a checkpoint."""
    if not Path(ckpt_path).is_file():
        raise DiffuseError(f"{key}={ckpt_path} does not exist")
    try:
        ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise DiffuseError(f"{key}={ckpt_path} is not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict):
        raise DiffuseError(f"{key}={ckpt_path} is not a checkpoint")
    return ckpt


def load_run(ckpt_path: str, map_location="cpu"):
    """(config, tokenizer, DiffusionLM) rebuilt from one checkpoint file, weights loaded, eval mode."""
    from diffuse.build import build_module
    from diffuse.data.tokenizers import tokenizer_from_state

    ckpt = read_checkpoint(ckpt_path, "ckpt", map_location)
    meta = ckpt.get("diffuse")
    if not meta or not meta.get("tokenizer"):
        raise DiffuseError(f"ckpt={ckpt_path} was not written by diffuse (no config/tokenizer inside)")
    cfg = OmegaConf.create(meta["config"])
    tokenizer = tokenizer_from_state(meta["tokenizer"])
    module = build_module(cfg, tokenizer, run_config=meta["config"], legacy=True)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    return cfg, tokenizer, module


def checkpoint_tokenizer(ckpt: dict, ckpt_path: str):
    """The tokenizer a diffuse checkpoint (an already-read dict) was trained with."""
    from diffuse.data.tokenizers import tokenizer_from_state

    meta = ckpt.get("diffuse") or {}
    if not meta.get("tokenizer"):
        raise DiffuseError(f"ckpt_path={ckpt_path} was not written by diffuse (no tokenizer inside)")
    return tokenizer_from_state(meta["tokenizer"])
