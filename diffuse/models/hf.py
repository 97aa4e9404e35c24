"""Any Hugging Face causal LM (`AutoModelForCausalLM`) as a diffusion backbone.

Built either from a config (`config: {model_type: llama, ...}` → `AutoConfig.for_model`, randomly
initialised) or from a local pretrained folder (`base_model`; a hub name works when online). The
model is made bidirectional by handing it a ready 4D attention mask: transformers (5.x,
`masking_utils`) uses a 4D mask as given instead of building its causal one. The mask comes from
`segment_ids` (diffuse.models.layers.attention_mask), so a token sees only its own document and never
padding; it is additive (0 / dtype-min), which the sdpa and eager attention paths both accept.
Positions restart at 0 in every document, so a packed document is computed exactly as if alone.

Remote-code diffusion folders (LLaDA, Dream, diffuse's own format=remote export): `trust_remote_code=true` loads
the folder's own modeling file (AutoModelForCausalLM when its auto_map names one, else AutoModel) and reads its
`.logits` (the head is inside: `logits` passes them on). The 4D pattern goes in as the forward's `attention_bias`
where it has one (LLaDA: its `attention_mask` is a 2D padding mask) and as `attention_mask` otherwise (Dream,
format=remote); `position_ids` only where the forward takes them (LLaDA numbers 0..L−1 itself: RoPE is relative and
documents never see each other, so a packed document's logits are the same); `mask_token_id` (null: the folder config's) must be the
tokenizer's [MASK]; `logit_shift=true` for Dream-style models whose position i predicts token i+1. A2D for a causal
LM (models/hf_adapt.py): an added [MASK] starts at the mean embedding, `anneal_steps` opens the causal attention to
the bidirectional one during training; `lora` trains peft adapters only.
"""

from __future__ import annotations

import inspect

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from diffuse.core.checks import check_range
from diffuse.errors import DiffuseError
from diffuse.models.hf_adapt import (anneal_ratio, annealed_mask, grow_vocabulary, merged, shift_right,
                                     with_lora)
from diffuse.models.layers import BlockLayout, attention_mask
from diffuse.registry import MODELS

# `debug=default` (and users) size every model with these keys; they map onto any HF config
GENERIC_KEYS = {"d_model": "hidden_size", "n_layers": "num_hidden_layers"}


def remote_keywords(model) -> tuple[str, bool]:
    """(the keyword a remote model's forward takes the 4D additive pattern under, whether it takes position_ids)."""
    params = inspect.signature(model.forward).parameters
    return ("attention_bias" if "attention_bias" in params else "attention_mask"), "position_ids" in params


@MODELS.register("hf")
class HFCausalLM(nn.Module):
    time_conditioned = False

    def __init__(
        self,
        vocab_size: int,
        config: dict | None = None,
        base_model: str | None = None,
        d_model: int | None = None,
        n_layers: int | None = None,
        attn_implementation: str = "sdpa",
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        compile: bool = False,
        trust_remote_code: bool = False,
        mask_token_id: int | None = None,
        logit_shift: bool = False,
        anneal_steps: int | None = None,
        lora: dict | None = None,
    ):
        super().__init__()
        check_range("model.d_model", d_model, 1, integer=True, null="config.hidden_size")
        check_range("model.n_layers", n_layers, 1, integer=True, null="config.num_hidden_layers")

        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise DiffuseError(f"model.dtype={dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        check_range("model.anneal_steps", anneal_steps, 1, integer=True, null="no annealing")
        if base_model is not None:
            self.model = _load_pretrained(base_model, attn_implementation, torch_dtype, trust_remote_code)
            # the tokenizer may have added [MASK]/[PAD]…: grow the embeddings (new rows: the mean one)
            grow_vocabulary(self.model, vocab_size)
        elif trust_remote_code:
            raise DiffuseError("model.trust_remote_code=true loads a folder's own modeling file: give model.base_model")
        else:
            cfg = _config_from_dict(config, vocab_size, {"d_model": d_model, "n_layers": n_layers})
            self.model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation,
                                                          dtype=torch_dtype)
        self.vocab_size = self.model.get_output_embeddings().out_features
        self.returns_logits = trust_remote_code  # remote code: call the whole model, its head included
        self.remote_keywords = remote_keywords(self.model) if trust_remote_code else None
        self.mask_token_id = mask_token_id if mask_token_id is not None else getattr(self.model.config,
                                                                                     "mask_token_id", None)
        self.logit_shift, self.anneal_steps = bool(logit_shift), anneal_steps
        self.global_step = 0  # DiffusionLM sets it before every training step (the annealing reads it)
        if lora:
            self.model = with_lora(self.model, dict(lora))
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if compile:
            self.decoder.compile(dynamic=True)  # in place: state-dict keys stay plain

    @property
    def decoder(self) -> nn.Module:
        """The model without its LM head (a property, not a submodule: state-dict keys appear once)."""
        return self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    supports_block_layout = True  # block diffusion: the layout's mask is handed over as the 4D mask

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False, layout: BlockLayout | None = None):
        """Hidden states [B, L, D] after the model's final norm; `t` is ignored (not time-conditioned).
        `layout`: block diffusion's pattern (models/layers.py); positions restart per document in each stream."""
        x = self.embed(ids) if embeds is None else embeds
        B, L, _ = x.shape
        seg = segment_ids if segment_ids is not None else torch.ones(B, L, dtype=torch.long, device=x.device)
        if layout is None and self.anneal_steps and self.training and not causal:
            allowed = annealed_mask(seg, anneal_ratio(self.global_step, self.anneal_steps))
            positions = document_positions(seg)
        elif layout is None:
            allowed, positions = attention_mask(seg, causal, L), document_positions(seg)
        else:  # each stream ([x_t ; x_0] in training) counts its own positions
            allowed = layout.mask(seg, B)
            positions = torch.empty_like(seg)
            for stream in (layout.clean, ~layout.clean):
                if stream.any():
                    positions[:, stream] = document_positions(seg[:, stream])
        additive = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        additive.masked_fill_(~allowed, torch.finfo(x.dtype).min)
        if self.returns_logits:
            mask_key, takes_positions = self.remote_keywords
            kwargs = {"inputs_embeds": x, mask_key: additive, **({"position_ids": positions} if takes_positions else {})}
            out = self.model(**kwargs).logits
        else:
            out = self.decoder(inputs_embeds=x, attention_mask=additive, position_ids=positions,
                               use_cache=False).last_hidden_state
        return shift_right(out) if self.logit_shift else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on hidden states; remote-code models gave their logits already."""
        return hidden if self.returns_logits else self.model.get_output_embeddings()(hidden)

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the base weights (export merge_lora=true): the same function, plain keys."""
        self.model = merged(self.model)


def document_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, … restarting wherever the segment id changes (padding counts on, unseen)."""
    L = segment_ids.shape[1]
    idx = torch.arange(L, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(1).values


def _config_from_dict(config: dict | None, vocab_size: int, generic: dict):
    spec = dict(config or {})
    model_type = spec.pop("model_type", None)
    if model_type is None:
        raise DiffuseError("model=hf needs model.config.model_type (e.g. llama) or model.base_model=/path")
    try:
        cfg = AutoConfig.for_model(model_type, **spec)
    except ValueError:
        raise DiffuseError(f"model.config.model_type={model_type!r} is not a transformers model type") from None
    for key, value in generic.items():
        if value is not None:
            setattr(cfg, GENERIC_KEYS[key], int(value))
    cfg.vocab_size = vocab_size
    cfg.use_cache = False
    return cfg


def _load_pretrained(base_model: str, attn_implementation: str, torch_dtype, trust_remote_code: bool = False):
    local = Path(base_model).expanduser()
    if str(base_model).startswith((".", "/", "~")) and not local.is_dir():
        raise DiffuseError(f"model.base_model={base_model} is not a folder")
    where = str(local) if local.is_dir() else base_model
    try:
        if trust_remote_code:  # LLaDA names AutoModelForCausalLM in its auto_map, Dream only AutoModel
            auto_map = getattr(AutoConfig.from_pretrained(where, trust_remote_code=True), "auto_map", None) or {}
            auto = AutoModelForCausalLM if "AutoModelForCausalLM" in auto_map else AutoModel
            return auto.from_pretrained(where, trust_remote_code=True, dtype=torch_dtype)
        return AutoModelForCausalLM.from_pretrained(where, attn_implementation=attn_implementation, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise DiffuseError(
            f"model.base_model={base_model!r} could not be loaded ({type(err).__name__}); offline, use a local "
            "folder (model.base_model=/path/to/model) or drop base_model to build the tiny Llama from model.config"
        ) from None
