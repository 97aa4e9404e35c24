"""Bidirectional Mamba-2: a forward scan plus a scan of each document reversed, summed.

Each block is pre-norm residual: x + mixer_fwd(norm x) + R·mixer_bwd(R·norm x), where R reverses every
segment (document) in place, so right padding stays at the back and packed documents never meet.
`tie_directions` uses one mixer for both scans. In causal mode (the autoregressive objective) only
the forward scan runs, and a recurrent cache makes decoding cost one position per token.

The mixer's parameters carry mamba_ssm's `Mamba2` names and shapes (in_proj, conv1d, dt_bias, A_log,
D, norm, out_proj), so a state dict moves between the two. On CUDA with `mamba_ssm` importable the
scan runs through its Triton kernel (`use_kernels: auto`); everywhere else through `ssd.ssd_scan`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffuse.core.checks import check_order, check_range, in_range
from diffuse.errors import DiffuseError
from diffuse.models.layers import TimestepEmbedding, TokenEnds
from diffuse.models.ssd import reverse_within_runs, segment_runs, ssd_scan
from diffuse.registry import MODELS

log = logging.getLogger("diffuse")


@functools.cache
def kernel_scan():
    """mamba_ssm's chunked-scan kernel, or None. Imported lazily: mamba_ssm loads CUDA code on import."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # optional [cuda] extra
    except Exception:  # ImportError, or a CUDA/Triton failure while importing
        return None
    return mamba_chunk_scan_combined


@functools.cache
def announce(path: str) -> None:
    log.info("mamba2: scanning with %s", path)


def parse_use_kernels(value) -> bool | None:
    """`auto` → None (decide per device), else a bool."""
    text = str(value).lower()
    if text not in ("auto", "true", "false"):
        raise DiffuseError(f"model.use_kernels={value} must be auto, true or false")
    return None if text == "auto" else text == "true"


class GatedRMSNorm(nn.Module):
    """RMSNorm(y · silu(z)) per group of channels (mamba_ssm's RMSNormGated, norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y, z):
        gated = (y * F.silu(z)).float().unflatten(-1, (-1, self.group_size))
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed.flatten(-2) * self.weight.float()).to(y.dtype)


def causal_conv(xs: torch.Tensor, conv: nn.Conv1d, runs: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over [B, L, C]; with run ids, a position reads only its own run."""
    k = conv.kernel_size[0]
    if runs is None:
        return conv(xs.transpose(1, 2))[..., : xs.shape[1]].transpose(1, 2)
    w = conv.weight[:, 0]  # [C, k]; w[:, k-1] multiplies the current position
    out = xs * w[:, k - 1]
    for shift in range(1, k):
        same = (runs[:, shift:] == runs[:, :-shift])[..., None]
        out = out + F.pad((xs[:, :-shift] * same) * w[:, k - 1 - shift], (0, 0, shift, 0))
    return out if conv.bias is None else out + conv.bias


@dataclass
class MixerState:
    """Decoding state of one mixer: the last d_conv − 1 conv inputs and the SSM state."""

    conv: torch.Tensor
    ssm: torch.Tensor


class Mamba2Mixer(nn.Module):
    def __init__(self, d_model, d_state, d_conv, expand, headdim, ngroups, chunk_size,
                 A_init_range, dt_min, dt_max, dt_init_floor):
        super().__init__()
        d_inner = expand * d_model
        if d_inner % headdim or (d_inner // headdim) % ngroups:
            raise DiffuseError(f"model.expand·d_model={d_inner} must split into heads of model.headdim={headdim} "
                               f"divisible among model.ngroups={ngroups}")
        self.d_inner, self.d_state, self.headdim, self.ngroups = d_inner, d_state, headdim, ngroups
        self.nheads, self.chunk_size = d_inner // headdim, chunk_size
        conv_dim = d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + self.nheads, bias=False)  # z, x, B, C, dt
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)
        # dt log-uniform in [dt_min, dt_max], stored through softplus's inverse; A uniform in A_init_range
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(d_inner, d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def new_state(self, batch: int, like: torch.Tensor) -> MixerState:
        k = self.conv1d.kernel_size[0]
        return MixerState(like.new_zeros(batch, k - 1, self.conv1d.in_channels),
                          like.new_zeros(batch, self.nheads, self.headdim, self.d_state, dtype=torch.float32))

    def forward(self, u, runs=None, real=None, use_kernel=False, state: MixerState | None = None):
        """u [B, L, d_model]. `runs` [B, L] (or [B, d_conv − 1 + L] with a `state`: the cached conv
        inputs come first); `real` [B, L] marks non-padding positions."""
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        initial_state = initial_run = None
        if state is not None:
            prefix = state.conv.shape[1]
            extended = torch.cat([state.conv, xBC], dim=1)
            state.conv = extended[:, extended.shape[1] - prefix:]
            xBC = causal_conv(extended, self.conv1d, runs)[:, prefix:]
            initial_state, initial_run, runs = state.ssm, runs[:, prefix - 1], runs[:, prefix:]
        else:
            xBC = causal_conv(xBC, self.conv1d, runs)
        x, B, C = F.silu(xBC).split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        if real is not None:  # padding feeds nothing in (run masks already isolate it; this is a second guard)
            x = x * real[..., None].to(x.dtype)
        Bsz, L, _ = x.shape
        x = x.reshape(Bsz, L, self.nheads, self.headdim)
        B, C = B.reshape(Bsz, L, self.ngroups, self.d_state), C.reshape(Bsz, L, self.ngroups, self.d_state)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        if use_kernel and state is None:
            seq_idx = None if runs is None else runs.to(torch.int32).contiguous()
            y = kernel_scan()(x.contiguous(), dt.contiguous(), A, B.contiguous(), C.contiguous(),
                              chunk_size=self.chunk_size, seq_idx=seq_idx)
        else:
            y, final = ssd_scan(x, dt, A, B, C, runs, self.chunk_size, initial_state, initial_run)
            if state is not None:
                state.ssm = final
        y = y + x * self.D.to(y.dtype)[:, None]  # the D skip, outside the scan on both paths
        return self.out_proj(self.norm(y.reshape(Bsz, L, self.d_inner), z))


def reverse(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    if index is None:
        return x.flip(1)
    return x.gather(1, index[..., None].expand_as(x))


@dataclass
class ScanContext:
    """What every block needs about the positions of this forward pass, computed once."""

    runs: torch.Tensor | None
    real: torch.Tensor | None
    reverse_index: torch.Tensor | None
    use_kernel: bool


class BiMamba2Block(nn.Module):
    def __init__(self, d_model: int, tie_directions: bool, mixer_args: dict):
        super().__init__()
        self.norm = nn.RMSNorm(d_model)
        self.forward_mixer = Mamba2Mixer(d_model, **mixer_args)
        self.backward_mixer = None if tie_directions else Mamba2Mixer(d_model, **mixer_args)

    def forward(self, x, ctx: ScanContext, causal: bool, state: MixerState | None = None):
        h = self.norm(x)
        y = self.forward_mixer(h, ctx.runs, ctx.real, ctx.use_kernel, state)
        if not causal:  # runs occupy the same positions after the in-place reversal
            backward = self.backward_mixer or self.forward_mixer
            y = y + reverse(backward(reverse(h, ctx.reverse_index), ctx.runs, ctx.real, ctx.use_kernel), ctx.reverse_index)
        return x + y


@dataclass
class Mamba2Cache:
    """Recurrent decoding state: one MixerState per layer and the last d_conv − 1 segment ids."""

    layers: list = field(default_factory=list)
    segment_ids: torch.Tensor | None = None


@MODELS.register("mamba2")
class Mamba2(TokenEnds):
    supports_block_layout = False  # a bidirectional scan has no block-causal form here: refuses objective.block_size

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        n_layers: int = 4,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 32,
        ngroups: int = 1,
        chunk_size: int = 64,
        A_init_range: tuple = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        tie_directions: bool = False,
        time_conditioning: bool = False,
        tie_weights: bool = True,
        use_kernels: str | bool = "auto",
    ):
        super().__init__()
        for key, value in (("d_model", d_model), ("n_layers", n_layers), ("d_state", d_state), ("expand", expand),
                           ("headdim", headdim), ("ngroups", ngroups)):
            check_range(f"model.{key}", value, 1, integer=True)
        if not (len(A_init_range) == 2 and all(in_range(a, 0, low_open=True) for a in A_init_range)
                and A_init_range[0] <= A_init_range[1]):
            raise DiffuseError(f"model.A_init_range={list(A_init_range)} must be two numbers 0 < low ≤ high")
        check_range("model.dt_min", dt_min, 0, low_open=True)
        check_range("model.dt_max", dt_max, 0, low_open=True)
        check_order("model.dt_min", dt_min, "model.dt_max", dt_max)
        check_range("model.dt_init_floor", dt_init_floor, 0)
        if not 2 <= d_conv <= 4:
            raise DiffuseError(f"model.d_conv={d_conv} must be 2, 3 or 4 (mamba-ssm's conv kernels allow no other)")
        if chunk_size < 1:
            raise DiffuseError(f"model.chunk_size={chunk_size} must be positive")
        self.use_kernels = parse_use_kernels(use_kernels)
        if self.use_kernels and kernel_scan() is None:
            raise DiffuseError("model.use_kernels=true but mamba_ssm cannot be imported (install the `cuda` extra); "
                               "use model.use_kernels=auto")
        self.vocab_size, self.d_model, self.d_conv = vocab_size, d_model, d_conv
        mixer_args = dict(d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups,
                          chunk_size=chunk_size, A_init_range=tuple(A_init_range), dt_min=dt_min, dt_max=dt_max,
                          dt_init_floor=dt_init_floor)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.time_emb = TimestepEmbedding(d_model) if time_conditioning else None
        self.blocks = nn.ModuleList(BiMamba2Block(d_model, tie_directions, mixer_args) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        # linear maps and embeddings as in the transformer; conv1d, dt_bias, A_log, D keep Mamba-2's init
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / (2 * n_layers) ** 0.5 if name.endswith("out_proj") else 0.02  # GPT-2 depth scaling
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.use_kernels is False:
            announce("the pure-PyTorch SSD scan (model.use_kernels=false)")
            return False
        if not x.is_cuda:
            if self.use_kernels:
                raise DiffuseError(f"model.use_kernels=true needs CUDA tensors; got {x.device}")
            announce("the pure-PyTorch SSD scan (not on CUDA)")
            return False
        if kernel_scan() is None:
            announce("the pure-PyTorch SSD scan (mamba_ssm not importable)")
            return False
        announce("mamba-ssm's mamba_chunk_scan_combined kernel")
        return True

    def forward(self, ids=None, embeds=None, t=None, segment_ids=None, causal=False, cache: Mamba2Cache | None = None):
        """Hidden states [B, L, D] after the final norm. Give `ids` or `embeds` (continuous inputs)."""
        x = self.inputs(ids, embeds, t)
        if cache is not None:
            return self._forward_cached(x, segment_ids, causal, cache)
        runs = None if segment_ids is None else segment_runs(segment_ids)
        ctx = ScanContext(
            runs=runs,
            real=None if segment_ids is None else segment_ids > 0,
            reverse_index=None if causal or runs is None else reverse_within_runs(runs),
            use_kernel=self._use_kernel(x),
        )
        for block in self.blocks:
            x = block(x, ctx, causal)
        return self.norm(x)

    def _forward_cached(self, x, segment_ids, causal, cache: Mamba2Cache):
        """Continue a causal scan from the cache (any number of new positions; the PyTorch scan)."""
        if not causal:
            raise DiffuseError("a mamba2 cache carries a left-to-right state: call with causal=True")
        B, L, _ = x.shape
        seg = segment_ids if segment_ids is not None else torch.ones(B, L, dtype=torch.long, device=x.device)
        if cache.segment_ids is None:  # an empty history: padding with zero conv inputs and zero state
            cache.segment_ids = seg.new_zeros(B, self.d_conv - 1)
            cache.layers = [block.forward_mixer.new_state(B, x) for block in self.blocks]
        extended = torch.cat([cache.segment_ids, seg], dim=1)
        cache.segment_ids = extended[:, L:]
        ctx = ScanContext(runs=segment_runs(extended), real=seg > 0, reverse_index=None, use_kernel=False)
        for block, state in zip(self.blocks, cache.layers):
            x = block(x, ctx, causal=True, state=state)
        return self.norm(x)

    def new_cache(self, max_length: int | None = None) -> Mamba2Cache:
        """An empty recurrent cache; its state has a fixed size, so `max_length` is accepted and ignored."""
        return Mamba2Cache()
