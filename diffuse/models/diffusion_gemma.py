"""DiffusionGemma (transformers' `DiffusionGemmaForBlockDiffusion`) as a diffuse backbone: transformers' own
classes, wrapped, never copied, so a folder of real weights and diffuse's samplers run the same network.

One weight set, two passes (transformers/models/diffusion_gemma): the *encoder* runs causally over the context
and writes the KV cache; the *decoder* runs bidirectionally over a canvas of `canvas_length` tokens, reads that
cache (never writes it) and adds a self-conditioning signal from the previous step's logits. `encode` and
`denoise` are those two passes (contracts.EncodesCanvas); the generic Backbone call is the encoder's causal pass
(the decoder cannot run without a context in the cache, so a bidirectional call is refused in one line).

Built from a local folder (`path=`, what `from_pretrained` reads) or from `config=` (the text config's keys and
`canvas_length`, randomly initialised; a one-layer vision tower of width 8 is built beside it, as the class always
builds one); `canvas_length=` overrides either's canvas.
The cache is transformers' DynamicCache: its StaticCache path miscounts once the context passes the sliding
window (the decoder's mask is cut at the window while the keys are not).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache

from diffuse.core.checks import check_range
from diffuse.errors import DiffuseError
from diffuse.registry import MODELS

# the vision tower DiffusionGemmaEncoderModel always builds: as small as Gemma4VisionConfig allows, unused by text
TINY_VISION = dict(model_type="gemma4_vision", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                   num_attention_heads=1, num_key_value_heads=1, head_dim=8, position_embedding_size=16,
                   patch_size=2, pooling_kernel_size=1)


@MODELS.register("diffusion_gemma")
class DiffusionGemma(nn.Module):
    time_conditioned = False

    def __init__(self, vocab_size: int, path: str | None = None, config: dict | None = None,
                 canvas_length: int | None = None, d_model: int | None = None, n_layers: int | None = None,
                 attn_implementation: str = "sdpa", dtype: str = "float32"):
        super().__init__()
        check_range("model.d_model", d_model, 1, integer=True, null="config.hidden_size")
        check_range("model.n_layers", n_layers, 1, integer=True, null="config.num_hidden_layers")
        check_range("model.canvas_length", canvas_length, 1, integer=True, null="the folder's or config's")
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise DiffuseError(f"model.dtype={dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        if path is not None:
            self.model = _load(path, attn_implementation, torch_dtype)
            if vocab_size > self.model.config.text_config.vocab_size:
                raise DiffuseError(f"the tokenizer's {vocab_size} tokens do not fit model.path={path}'s vocabulary of "
                                   f"{self.model.config.text_config.vocab_size}: use the folder's own tokenizer")
            if canvas_length is not None:
                self.model.config.canvas_length = int(canvas_length)
        else:
            if not config:
                raise DiffuseError("model=diffusion_gemma needs model.path=/folder or model.config (text config keys)")
            text = {**dict(config), "vocab_size": vocab_size}
            canvas = int(canvas_length or text.pop("canvas_length", 256))  # a top-level key of DiffusionGemmaConfig
            text.pop("canvas_length", None)
            if d_model is not None:  # debug=default sizes every model with these two keys
                text["hidden_size"] = d_model
            if n_layers is not None and n_layers != text.get("num_hidden_layers"):
                text["num_hidden_layers"] = n_layers
                text.pop("layer_types", None)  # Gemma's own pattern: five sliding to one full, the last full
            cfg = DiffusionGemmaConfig(text_config=text, vision_config=dict(TINY_VISION), canvas_length=canvas)
            cfg._attn_implementation = attn_implementation
            self.model = DiffusionGemmaForBlockDiffusion(cfg).to(torch_dtype)
        self.vocab_size = self.model.config.text_config.vocab_size
        self.canvas_length = int(self.model.config.canvas_length)

    # -- the Backbone contract --------------------------------------------------------------------------------
    @property
    def text(self) -> nn.Module:
        """The encoder's text model (its weights are the decoder's: tied)."""
        return self.model.model.encoder.language_model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.decoder.embed_tokens(ids)

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False, **unsupported):
        """Hidden states [B, L, D] of the encoder's causal pass (what writes the KV cache). Padding (segment 0)
        is masked; packed documents are not told apart (this model takes one document a row). What other
        backbones take besides (a `cache=` of sampler=ar, a block `layout=`) is refused in one line, not ignored."""
        if unsupported:
            raise DiffuseError(f"model=diffusion_gemma's generic call takes no {', '.join(sorted(unsupported))}: "
                               "decode it with sampler=entropy_bound (objective=diffusion_gemma)")
        if embeds is not None or not causal:
            raise DiffuseError("model=diffusion_gemma runs token ids causally here; its bidirectional pass is "
                               "encode + denoise (objective=diffusion_gemma, sampler=entropy_bound)")
        mask = None if segment_ids is None else segment_ids > 0
        return self.text(input_ids=ids, attention_mask=mask, cache=self.new_cache(0)).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head and Gemma's final soft-capping, in float32 (as `DiffusionGemmaForBlockDiffusion.forward`)."""
        cap = self.model.final_logit_softcapping
        logits = self.model.lm_head(hidden).float()
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # -- contracts.Cached and contracts.EncodesCanvas --------------------------------------------------------
    def new_cache(self, max_length: int = 0) -> DynamicCache:
        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
               cache: DynamicCache) -> torch.Tensor:
        """The causal pass over the new context tokens `ids` [B, n] at `positions` [1 or B, n]; appends their K/V
        to `cache`. `attention_mask` [B, cached + n] is False on padding. Returns the hidden states [B, n, D]."""
        out = self.model.model.encoder(input_ids=ids, attention_mask=attention_mask.bool(), cache=cache,
                                       position_ids=positions)
        return out.last_hidden_state

    def denoise(self, canvas: torch.Tensor, cache: DynamicCache, attention_mask: torch.Tensor,
                positions: torch.Tensor, self_conditioning_logits: torch.Tensor | None = None,
                self_conditioning_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C, V] of the bidirectional pass over `canvas` [B, C] after the cached context;
        `attention_mask` [B, cached + C]; self-conditioning on the previous logits (None: zeros; per row off
        where `self_conditioning_mask` is False). The cache is read, never written."""
        mask = self.model.model.decoder.create_diffusion_decoder_attention_mask(
            config=self.model.config, inputs_embeds=canvas.unsqueeze(-1), cache=cache,
            decoder_attention_mask=attention_mask.bool())
        return self.model(decoder_input_ids=canvas, cache=cache, decoder_attention_mask=mask,
                          decoder_position_ids=positions, self_conditioning_logits=self_conditioning_logits,
                          self_conditioning_mask=self_conditioning_mask).logits


def _load(path: str, attn_implementation: str, torch_dtype) -> DiffusionGemmaForBlockDiffusion:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise DiffuseError(f"model.path={path} is not a DiffusionGemma folder (no config.json)")
    try:
        return DiffusionGemmaForBlockDiffusion.from_pretrained(str(folder), attn_implementation=attn_implementation,
                                                               dtype=torch_dtype)
    except (OSError, ValueError, TypeError) as err:
        raise DiffuseError(f"model.path={path} could not be loaded as DiffusionGemma ({type(err).__name__})") from None
