"""Our transformer (models/transformer.py) as a stock `LlamaForCausalLM`: the same network under Llama's names.

Both rotate the (first half, second half) pairs of each head (GPT-NeoX / Llama, not the interleaved pairs of
the original RoPE), use bias-free projections, SwiGLU (silu(gate)·up) and RMSNorm; torch's nn.RMSNorm without
an eps uses the dtype's machine epsilon, which Llama gets written out (float32's: its norms run in float32).
Our fused projections split in order: qkv rows are [q ; k ; v], gate_up rows are [gate ; up].
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from diffuse.errors import DiffuseError
from diffuse.models.transformer import Transformer

RMS_EPS = torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) on float32 activations


def llama_config(backbone, rope_base: float, max_position_embeddings: int, special: dict) -> LlamaConfig:
    """`rope_base`: model.rope_base of the run (the module keeps only its frequencies); `special`: pad/bos/eos ids."""
    if not isinstance(backbone, Transformer):
        raise DiffuseError(f"format=llama exports model=transformer only, not {type(backbone).__name__}")
    if backbone.time_conditioned:
        raise DiffuseError("format=llama cannot carry model.time_conditioning=true (Llama has no timestep input)")
    if getattr(backbone, "self_cond", None) is not None:
        raise DiffuseError("format=llama cannot carry model.self_condition=true (Llama has no self-conditioning input)")
    block = backbone.blocks[0]
    return LlamaConfig(
        vocab_size=backbone.vocab_size,
        hidden_size=backbone.d_model,
        intermediate_size=block.mlp.down.in_features,
        num_hidden_layers=len(backbone.blocks),
        num_attention_heads=block.attn.n_heads,
        num_key_value_heads=block.attn.n_heads,
        head_dim=block.attn.head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_base)},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=backbone.head.weight is backbone.tok_emb.weight,
        pad_token_id=special.get("pad"), bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
        architectures=["LlamaForCausalLM"],
        dtype="float32",
    )


def llama_state_dict(backbone: Transformer) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` keys → tensors (contiguous copies: safetensors refuses views of a fused weight)."""
    D = backbone.d_model
    out = {"model.embed_tokens.weight": backbone.tok_emb.weight, "model.norm.weight": backbone.norm.weight}
    for i, block in enumerate(backbone.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(D)
        gate, up = block.mlp.gate_up.weight.chunk(2)
        out |= {
            p + "input_layernorm.weight": block.norm1.weight,
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.out.weight,
            p + "post_attention_layernorm.weight": block.norm2.weight,
            p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": block.mlp.down.weight,
        }
    if backbone.head.weight is not backbone.tok_emb.weight:
        out["lm_head.weight"] = backbone.head.weight
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
