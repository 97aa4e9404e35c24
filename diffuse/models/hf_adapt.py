"""Adapting a pretrained transformers model into a diffusion backbone (models/hf.py): A2D's pieces and LoRA.

- `grow_vocabulary`: a [MASK] (or any token) the tokenizer added gets an embedding row (and head row) equal to the
  mean of the trained rows, as DiffuLLaMA / dllm's A2D start it (transformers' own resize draws around the mean).
- `annealed_mask`: DiffuLLaMA's attention annealing, mask = causal OR Bernoulli(r) with r = min(1, step /
  anneal_steps): a causal LM's attention opens to the full bidirectional one as training proceeds.
- `shift_right`: Dream's logit shift (position i predicts token i+1, the AR habit kept): the hidden state read for
  position i is the one of position i − 1 (position 0 keeps its own).
- `with_lora` / `merged`: peft LoRA adapters on the wrapped model (only they train), merged back for export.
"""

from __future__ import annotations

import torch
from torch import nn

from diffuse.core.checks import check_range
from diffuse.errors import DiffuseError
from diffuse.models.layers import attention_mask

LORA_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}


def grow_vocabulary(model, vocab_size: int) -> None:
    """Resize to `vocab_size` rows (never shrink trained ones); the new rows of the embedding and of an untied head
    are the mean of the old rows."""
    old = model.get_input_embeddings().num_embeddings
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    tables = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
              if m is not None}  # a tied head is the same tensor: once
    with torch.no_grad():
        for weight in tables.values():
            weight[old:] = weight[:old].mean(0)


def anneal_ratio(step: int, anneal_steps: int | None) -> float:
    """r = min(1, step / anneal_steps); 1 without annealing."""
    return 1.0 if not anneal_steps else min(1.0, step / anneal_steps)


def annealed_mask(segment_ids: torch.Tensor, r: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean [B, 1, L, L]: the causal mask OR an independent Bernoulli(r) draw per (query, key) pair, within the
    documents and padding rules of `attention_mask`. r = 0 is the causal mask, r = 1 the bidirectional one."""
    B, L = segment_ids.shape
    causal = attention_mask(segment_ids, True, L)
    if r <= 0:
        return causal
    full = attention_mask(segment_ids, False, L)
    if r >= 1:
        return full
    opened = torch.rand(B, 1, L, L, generator=generator, device=segment_ids.device) < r
    return causal | (full & opened)


def shift_right(hidden: torch.Tensor) -> torch.Tensor:
    return torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)


def with_lora(model: nn.Module, lora: dict) -> nn.Module:
    """peft's LoRA on `model`: every base weight frozen, adapters (r, alpha, dropout) on `target_modules`."""
    from peft import LoraConfig, get_peft_model  # local: peft is the optional `lora` extra

    unknown = set(lora) - set(LORA_KEYS)
    if unknown:
        raise DiffuseError(f"model.lora.{sorted(unknown)[0]} is not a LoRA key ({', '.join(LORA_KEYS)})")
    check_range("model.lora.r", lora.get("r", 8), 1, integer=True)
    check_range("model.lora.dropout", lora.get("dropout", 0.0), 0, 1, high_open=True)
    spec = {LORA_KEYS[k]: v for k, v in lora.items() if v is not None}
    try:
        return get_peft_model(model, LoraConfig(**spec))
    except ValueError as err:  # e.g. target modules that are not in the model
        raise DiffuseError(f"model.lora={lora} does not fit this model: {str(err).splitlines()[0]}") from None


def merged(model: nn.Module) -> nn.Module:
    """The model with its LoRA adapters folded into the base weights (peft's merge_and_unload)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
