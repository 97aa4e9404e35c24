"""Checkpoints: written atomically, and enough on their own to rebuild a run (config + tokenizer)."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffuse.core.io import atomic_write
from diffuse.data.tokenizers import tokenizer_from_state
from diffuse.errors import DiffuseError

log = logging.getLogger("diffuse")

# Every checkpoint diffuse reads is unpickled with torch.load(weights_only=True): tensors and plain
# containers only, so a file cannot run code when it is loaded. A trusted file written otherwise (a
# legacy checkpoint holding e.g. an OmegaConf object) loads with this variable set to 1.
TRUST_ENV = "DIFFUSE_TRUST_CHECKPOINTS"


def trusted() -> bool:
    return os.environ.get(TRUST_ENV, "").strip() == "1"


def safe_load(path, key: str, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True), the one place diffuse unpickles a checkpoint. A file that needs more
    (a pickled object, i.e. code run on load) is refused in one line naming `key=path`; with
    DIFFUSE_TRUST_CHECKPOINTS=1 it is loaded in full, with a warning."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if not unsafe:
            raise DiffuseError(f"{key}={path} is not a readable checkpoint (UnpicklingError)") from None
        if not trusted():
            raise DiffuseError(f"{key}={path} needs unsafe unpickling (it holds {unsafe.group(1)}, not only tensors "
                               f"and plain containers): refused; if you trust the file, set {TRUST_ENV}=1") from None
        log.warning("%s=%s holds %s: unpickled in full because %s=1", key, path, unsafe.group(1), TRUST_ENV)
    except Exception as err:
        raise DiffuseError(f"{key}={path} is not a readable checkpoint ({type(err).__name__})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as err:
        raise DiffuseError(f"{key}={path} is not a readable checkpoint ({type(err).__name__})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same folder, fsync it, rename, fsync the folder: a crash (or a
    power loss) leaves the old file or the new one, never half of one; a failed write leaves no temp file.
    `preloaded`: {path: dict} already read (on CPU) by the entry point, handed to Lightning's resume once
    instead of reading the file a second time."""

    def __init__(self, preloaded: dict[str, dict] | None = None):
        super().__init__()
        self.preloaded = {os.path.realpath(p): ckpt for p, ckpt in (preloaded or {}).items()}

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        """Lightning's resume (`trainer.fit(ckpt_path=…)`) reads through here, as safely as every other
        diffuse load: Lightning's `weights_only` argument is not what opts out, DIFFUSE_TRUST_CHECKPOINTS=1 is."""
        ckpt = self.preloaded.pop(os.path.realpath(path), None)
        if ckpt is not None and map_location in (None, "cpu"):
            return ckpt
        return read_checkpoint(str(path), "ckpt_path", map_location if map_location is not None else "cpu")

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_write(path, "wb") as f:
            torch.save(checkpoint, f)


def read_checkpoint(ckpt_path: str, key: str, map_location="cpu", mmap: bool = False) -> dict:
    """A checkpoint as a dict (weights_only unpickling, see `safe_load`), with a one-line error naming
    `key=path` when the path is missing, a folder, not a checkpoint, or needs unsafe unpickling."""
    path = Path(ckpt_path)
    if path.is_dir():
        inside = [f for f in (path / "last.ckpt", path / "checkpoints" / "last.ckpt") if f.is_file()]
        inside = inside or sorted(path.glob("*.ckpt")) or sorted(path.glob("checkpoints/*.ckpt"))
        hint = f"; e.g. {key}={inside[0]}" if inside else " (no .ckpt file in it)"
        raise DiffuseError(f"{key}={ckpt_path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise DiffuseError(f"{key}={ckpt_path} does not exist")
    ckpt = safe_load(ckpt_path, key, map_location, mmap)
    if not isinstance(ckpt, dict):
        raise DiffuseError(f"{key}={ckpt_path} is not a checkpoint")
    return ckpt


# sampler keys renamed since checkpoints were first written: {sampler: {old key: new key}}
RENAMED_SAMPLER_KEYS = {"llada": {"block_length": "span_length"}, "threshold": {"block_length": "span_length"},
                        "ddim": {"temperature": "noise_scale"}}


def stored_config(ckpt: dict) -> dict:
    """The run config a diffuse checkpoint (an already-read dict) carries, under today's key names; {} for other
    files."""
    config = (ckpt.get("diffuse") or {}).get("config") or {}
    sampler = config.get("sampler") or {}
    # no name: the objective's own sampler (llada's is llada, continuous's is ddim)
    name = sampler.get("name") or {"continuous": "ddim"}.get((config.get("objective") or {}).get("name"), "llada")
    renames = {old: new for old, new in RENAMED_SAMPLER_KEYS.get(name, {}).items() if old in sampler}
    if renames:  # a new dict: the checkpoint read keeps what its file holds
        config = {**config, "sampler": {renames.get(k, k): v for k, v in sampler.items()}}
    return config


def checkpoint_tokenizer(ckpt: dict, ckpt_path: str):
    """The tokenizer a diffuse checkpoint (an already-read dict) was trained with."""
    meta = ckpt.get("diffuse") or {}
    if not meta.get("tokenizer"):
        raise DiffuseError(f"ckpt_path={ckpt_path} was not written by diffuse (no tokenizer inside)")
    return tokenizer_from_state(meta["tokenizer"])
