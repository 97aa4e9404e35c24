"""Our transformer as a remote-code folder in the LLaDA / Dream convention: config.json with `auto_map` naming the
modeling file this package holds (modeling_diffuse.py, copied beside it), the weights under our own names, and
`mask_token_id`, so `AutoModel.from_pretrained(folder, trust_remote_code=True)` runs it without diffuse."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from diffuse.errors import DiffuseError
from diffuse.models.transformer import Transformer

MODELING_FILE = Path(__file__).with_name("modeling_diffuse.py")
AUTO_MAP = {name: f"modeling_diffuse.{cls}" for name, cls in (
    ("AutoConfig", "DiffuseConfig"), ("AutoModel", "DiffuseModel"), ("AutoModelForMaskedLM", "DiffuseModel"))}


def remote_config(backbone, rope_base: float, causal: bool, special: dict, block_size: int | None) -> dict:
    """config.json's content; `special`: pad/bos/eos/mask token ids."""
    if not isinstance(backbone, Transformer):
        raise DiffuseError(f"format=remote exports model=transformer only, not {type(backbone).__name__}")
    for flag, module in (("time_conditioning", backbone.time_emb), ("self_condition", getattr(backbone, "self_cond", None))):
        if module is not None:
            raise DiffuseError(f"format=remote cannot carry model.{flag}=true (the modeling file has no such input)")
    block = backbone.blocks[0]
    return {
        "architectures": ["DiffuseModel"], "model_type": "diffuse_transformer", "auto_map": AUTO_MAP,
        "vocab_size": backbone.vocab_size, "hidden_size": backbone.d_model,
        "intermediate_size": block.mlp.down.in_features, "num_hidden_layers": len(backbone.blocks),
        "num_attention_heads": block.attn.n_heads, "rope_theta": float(rope_base), "causal": bool(causal),
        "block_size": block_size, "tie_word_embeddings": backbone.head.weight is backbone.tok_emb.weight,
        "mask_token_id": special["mask"], "pad_token_id": special["pad"], "bos_token_id": special["bos"],
        "eos_token_id": special["eos"], "dtype": "float32",
    }


def remote_state_dict(backbone: Transformer) -> dict[str, torch.Tensor]:
    """The backbone's own keys (the modeling file names its modules alike); a tied head is left to the tying."""
    state = backbone.state_dict()
    if backbone.head.weight is backbone.tok_emb.weight:
        state.pop("head.weight")
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def copy_modeling_file(out_dir: Path) -> None:
    shutil.copyfile(MODELING_FILE, out_dir / MODELING_FILE.name)
