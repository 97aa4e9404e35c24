"""A diffuse transformer as remote code (the LLaDA / Dream convention): this file is copied next to config.json and
model.safetensors by `python -m diffuse.export format=remote`, and `AutoModel.from_pretrained(folder,
trust_remote_code=True)` runs it. Self-contained on purpose: torch and transformers only, never diffuse.

The network is diffuse's models/transformer.py under the same parameter names: RoPE rotating (first half, second
half) pairs, SwiGLU, RMSNorm with torch's default eps, fused q/k/v, bidirectional unless config.causal.
`forward(input_ids, attention_mask=None, position_ids=None)` returns `.logits` [B, L, V] for every position
(position i predicts token i: no shift). attention_mask: [B, L] (1 = token, 0 = padding: padding is never seen)
or a boolean [B, 1, L, L] pattern (True = may attend), e.g. block diffusion's block-causal one. config.mask_token_id
is the [MASK] the model was trained to fill; config.block_size the block length of a block-diffusion model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class DiffuseConfig(PretrainedConfig):
    model_type = "diffuse_transformer"

    def __init__(self, vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=192, rope_theta=10_000.0, causal=False, mask_token_id=None, block_size=None,
                 tie_word_embeddings=True, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.rope_theta, self.causal, self.mask_token_id, self.block_size = rope_theta, causal, mask_token_id, block_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rotate(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.n_heads, self.head_dim = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask, causal):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, attn_mask=mask,
                                           is_causal=causal and mask is None)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(d), Attention(d, heads)
        self.norm2, self.mlp = nn.RMSNorm(d), MLP(d, hidden)

    def forward(self, x, cos, sin, mask, causal):
        x = x + self.attn(self.norm1(x), cos, sin, mask, causal)
        return x + self.mlp(self.norm2(x))


class DiffuseModel(PreTrainedModel):
    config_class = DiffuseConfig
    base_model_prefix = "diffuse"
    _tied_weights_keys = {"head.weight": "tok_emb.weight"}
    _supports_sdpa = True

    def __init__(self, config: DiffuseConfig):
        super().__init__(config)
        d, heads = config.hidden_size, config.num_attention_heads
        self.tok_emb = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(Block(d, heads, config.intermediate_size) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.tok_emb

    def set_input_embeddings(self, value):
        self.tok_emb = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, L, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=x.device)
        # computed here, not a buffer: from_pretrained builds the model on the meta device and never fills those
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(position_ids.float().flatten(), inv_freq.to(x.device)).view(*position_ids.shape, -1)
        cos, sin = freqs.cos(), freqs.sin()
        if freqs.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        mask = attention_mask
        if mask is not None and mask.dim() == 2:  # padding: never a key; each query still sees itself
            keys = mask.bool()[:, None, None, :].expand(B, 1, L, L)
            mask = keys | torch.eye(L, dtype=torch.bool, device=x.device)
            if self.config.causal:
                mask = mask & torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        elif mask is not None:
            mask = mask.bool() if mask.dtype == torch.bool or not mask.is_floating_point() else mask
        for block in self.blocks:
            x = block(x, cos, sin, mask, self.config.causal)
        return MaskedLMOutput(logits=self.head(self.norm(x)))
