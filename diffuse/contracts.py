"""The written contracts between diffuse's component families. Everything else is built on these.

A component is one registered class (`@OBJECTIVES.register("name")`) plus one yaml in its config group.
`DiffusionLM` and the entry points use only what is declared here, never a component's name.

Processes: an objective declares the noising process it runs; a sampler declares the processes whose
reverse it knows. `build_sampler` refuses a pair that does not match (one line), so no sampler can fill a
canvas with [MASK] for a model that never saw one.

Capabilities: whatever a sampler, distiller or regularizer calls on an objective or a backbone beyond the
contracts is declared here too, as a small Protocol (Absorbing, Gaussian, Blockwise, Cached, …). A sampler
lists the ones it needs in `requires`, checked by `build_sampler` (one line); a capability that genuinely
varies (a backbone with or without a cache) is asked of the Protocol (`isinstance(backbone, Cached)`), never
probed by name.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict, runtime_checkable

import torch
from typing_extensions import NotRequired

from diffuse.errors import DiffuseError

# The noising processes known today; a plugin may declare a new one (any string) together with its samplers.
ABSORBING = "absorbing"  # tokens jump to [MASK] (masked_discrete, llada)
GAUSSIAN = "gaussian"  # Gaussian noise on embeddings (continuous)
AUTOREGRESSIVE = "autoregressive"  # no noise: left to right (autoregressive)
BLOCK_ABSORBING = "block_absorbing"  # absorbing inside blocks, block-causal across them (objective.block_size)
UNIFORM = "uniform"  # tokens jump to a uniformly random vocabulary token (uniform, DiffusionGemma); no [MASK]
BLOCK_UNIFORM = "block_uniform"  # uniform inside blocks, block-causal across them (objective.block_size)


class Batch(TypedDict):
    """What the DataModule yields and every objective reads. Shapes [B, L]."""

    input_ids: torch.Tensor  # long token ids
    segment_ids: torch.Tensor  # long; 0 on padding, 1, 2, … one id per packed document
    prompt_mask: NotRequired[torch.Tensor]  # bool/long, SFT only: 1 on prompt tokens (never noised)


@runtime_checkable
class Backbone(Protocol):
    """A network from token ids (or embeddings) to hidden states, and hidden states to logits."""

    vocab_size: int
    time_conditioned: bool  # True: its output depends on t (samplers cannot reuse logits across steps)

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                 t: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                 causal: bool = False, **kwargs: Any) -> torch.Tensor:
        """Hidden states [B, L, D]; `causal` selects causal attention / a one-direction scan."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of hidden states [..., D] (any leading shape)."""
        ...


@runtime_checkable
class Objective(Protocol):
    """A training objective: an `nn.Module` (it may own networks and buffers: a frozen teacher, an
    EMA target; see diffuse/run/frozen.py). `DiffusionLM` sets `global_step` on it before every training
    step (curricula, annealing), so it never reaches into the trainer."""

    process: str  # ABSORBING | GAUSSIAN | AUTOREGRESSIVE | a plugin's own
    causal: bool  # the attention / scan the backbone must use
    default_sampler: str  # the sampler used when the config names none
    special: Any  # SpecialTokens

    def loss(self, backbone: Backbone, batch: Batch, generator: torch.Generator | None = None,
             train: bool = True) -> Any:
        """A LossOutput (objectives/base.py): the loss to optimise and the NLL bound behind val/nelbo."""
        ...


@runtime_checkable
class NoiseProcess(Protocol):
    """The noising hooks, declared once: what the consistency regularizer, the gradient analysis, the
    distillers and the samplers of a noising process use. An objective with a noise process gives all of them."""

    eps: float  # the smallest t it draws (t → 0 has unbounded ELBO weight)

    def sample_t(self, x0: torch.Tensor, generator: torch.Generator | None = None, train: bool = True,
                 t_range: tuple[float, float] | None = None) -> torch.Tensor:
        """t [B, 1] (or [B, L]); `t_range` draws inside [lo, hi] instead of the objective's own range."""
        ...

    def draw_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise drawn outside `corrupt`: the same noise at two times gives coupled corruptions."""
        ...

    def corrupt(self, x0: Any, t: torch.Tensor, noise: torch.Tensor, batch: Batch) -> Any: ...

    def predict(self, backbone: Backbone, z: Any, t: torch.Tensor, batch: Batch) -> torch.Tensor: ...

    def still_noisy(self, z: Any) -> torch.Tensor:
        """[B, L] bool: positions that carry noise in z."""
        ...

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Increasing in t, in [0, 1]: the mask ratio (absorbing) or 1 − ᾱ (Gaussian)."""
        ...

    def distance(self, pred: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> torch.Tensor: ...


# the noising hooks by name, in the order declared above (the order the messages list them)
NOISING_HOOKS = tuple(k for k, v in vars(NoiseProcess).items() if callable(v) and not k.startswith("_"))


@runtime_checkable
class NoisingObjective(Objective, NoiseProcess, Protocol):
    eps: float  # the smallest t

    def loss(self, backbone: Backbone, batch: Batch, generator: torch.Generator | None = None,
             train: bool = True, t_range: tuple[float, float] | None = None) -> Any:
        """As Objective.loss; `t_range` is handed to `sample_t` (the gradient analysis probes one
        corruption level at a time through it)."""
        ...


# -- capabilities: what a sampler, a distiller or a regularizer needs beyond the contracts above. A sampler
# lists the ones it needs from the objective in `requires`, and build_sampler checks them (one line).
@runtime_checkable
class Absorbing(NoisingObjective, Protocol):
    """The absorbing-state ("masked") family (objectives/absorbing.py): [MASK] jumps with probability p(t)."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """p(t), increasing in t."""
        ...

    def t_for_mask_prob(self, p: float) -> float:
        """The inverse of p(t)."""
        ...

    def log_probs(self, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The network's logits at the positions of z → log p(x0 | z) (SUBS), [..., V]."""
        ...


@runtime_checkable
class UniformState(NoisingObjective, Protocol):
    """The uniform-state family (objectives/uniform.py): a token jumps to a uniformly random one with 1 − α(t)."""

    def posterior(self, x: torch.Tensor, z: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(z_s | z_t = z, x) over the vocabulary [..., V] for s < t: x a one-hot x0 or the network's x_θ."""
        ...


@runtime_checkable
class Blockwise(Protocol):
    """An objective that may train block diffusion (BD3LM): `block_size` b, None for the full-sequence model."""

    block_size: int | None


@runtime_checkable
class TimeGrid(Protocol):
    """An objective on a grid of T discrete times t = k/T (the consistency regularizer steps on it)."""

    num_timesteps: int


@runtime_checkable
class CleanData(Protocol):
    """An objective that corrupts something other than the token ids (continuous: the embeddings)."""

    def clean(self, backbone: Backbone, batch: Batch) -> Any:
        """The clean x0 that `corrupt` takes."""
        ...


@runtime_checkable
class Gaussian(NoisingObjective, TimeGrid, Protocol):
    """Gaussian noise on embeddings (objectives/continuous.py): what DDIM steps with."""

    def embedding_table(self, backbone: Backbone) -> torch.Tensor:
        """[V, D]: every token's clean x0."""
        ...

    def round_logits(self, backbone: Backbone, x0_hat: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [..., V] of the token nearest to x̂0."""
        ...

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ(t) (float64)."""
        ...

    def noised(self, x: torch.Tensor, noisy: torch.Tensor) -> Any:
        """The corrupted state z of embeddings x with their noisy positions (what `predict` takes)."""
        ...


@runtime_checkable
class ChecksBackbone(Protocol):
    """An objective that needs more of the backbone than `Backbone` (block diffusion: a block layout)."""

    def check_backbone(self, backbone: Backbone, model_name: str) -> None:
        """A one-line DiffuseError when `backbone` cannot serve the objective as configured."""
        ...


@runtime_checkable
class Cached(Protocol):
    """A backbone that decodes through a cache: a KV cache (transformer) or a recurrent state (mamba2)."""

    def new_cache(self, max_length: int) -> Any:
        """An empty cache for up to `max_length` positions, handed back as `backbone(..., cache=cache)`."""
        ...


@runtime_checkable
class Seekable(Protocol):
    """A cache that can revisit positions (a KV cache; a recurrent state cannot)."""

    length: int  # positions filled

    def seek(self, pos: int) -> None:
        """The next call writes at pos ≤ length."""
        ...

    def truncate(self, n: int) -> None:
        """Forget every position ≥ n."""
        ...


@runtime_checkable
class EncodesCanvas(Cached, Protocol):
    """A backbone with DiffusionGemma's two passes (models/diffusion_gemma.py): a causal encoder that appends the
    context's K/V to the cache, and a bidirectional pass over a canvas of `canvas_length` tokens that reads it
    (never writes it), self-conditioned on the previous step's logits. sampler=entropy_bound decodes through it."""

    canvas_length: int

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
               cache: Any) -> torch.Tensor:
        """Hidden states [B, n, D] of the new context tokens; attention_mask [B, cached + n] False on padding."""
        ...

    def denoise(self, canvas: torch.Tensor, cache: Any, attention_mask: torch.Tensor, positions: torch.Tensor,
                self_conditioning_logits: torch.Tensor | None = None,
                self_conditioning_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C, V] of the canvas after the cached context (None: no self-conditioning)."""
        ...


@runtime_checkable
class TakesBlockLayout(Protocol):
    """A backbone that says whether it takes a `layout=` (models/layers.py BlockLayout): block diffusion."""

    supports_block_layout: bool


@runtime_checkable
class TakesCachedLayout(Protocol):
    """A backbone whose cached forward also takes a `layout=` over the new positions (the hybrid drafts against
    the AR cache through it)."""

    supports_cached_layout: bool


@runtime_checkable
class SelfConditioned(Protocol):
    """A backbone that may read the softmax of its previous logits (`backbone(..., prev_probs=[B, L, V])`:
    self-conditioning, `model.self_condition=true`); `self_conditioned` says whether this one was built with it."""

    self_conditioned: bool


@runtime_checkable
class TrainsSelfConditioning(Protocol):
    """An objective whose loss runs self-conditioning's first pass (objectives/base.py `self_condition_probs`): a
    self-conditioned backbone is refused (one line) with any other objective, whose training would never use it."""

    trains_self_conditioning: bool


def is_self_conditioned(backbone: Any) -> bool:
    """Whether `backbone` takes `prev_probs` (objectives run a first pass for it; samplers pass the last step's)."""
    return isinstance(backbone, SelfConditioned) and bool(backbone.self_conditioned)


@runtime_checkable
class DraftsForItself(Protocol):
    """An autoregressive objective whose network also drafts (objective=hybrid's draft row): up to
    `draft_block_size` masks right after a causal context, in one pass. sampler=speculative drafts with it when no
    drafter is given."""

    draft_block_size: int


@runtime_checkable
class Regularizer(Protocol):
    """An `nn.Module` added to the objective's loss: `reg(objective, backbone, batch, generator)`.
    `DiffusionLM` sets `global_step` on it before every training step."""

    def __call__(self, objective: Objective, backbone: Backbone, batch: Batch,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted loss to add, metrics logged as train/<key>)."""
        ...


@runtime_checkable
class Distiller(Protocol):
    """An `nn.Module` whose loss replaces the objective's in training (diffuse/distillation): built with the
    objective it trains, holding no state of its own (a student's checkpoint is an ordinary one)."""

    def loss(self, objective: Objective, backbone: Backbone, batch: Batch,
             generator: torch.Generator | None = None) -> Any:
        """A LossOutput: `loss` is optimised; validation keeps the objective's own bound."""
        ...


@runtime_checkable
class Sampler(Protocol):
    """A strategy over an objective's reverse process."""

    processes: tuple[str, ...]  # the objective processes it fits
    requires: tuple[type, ...]  # the capabilities (Protocols above) it needs of the objective
    any_length: bool  # may decode past the trained data.seq_len (block-causal decoding): a warning, not an error

    def generate(self, backbone: Backbone, objective: Objective, prompts: list[list[int]], length: int,
                 seed: int = 0) -> Any:
        """A SampleOutput (sampling/base.py): tokens, lengths, NFE for the batch and per row."""
        ...


@runtime_checkable
class DataSource(Protocol):
    """Raw text splits (`data.*` keys other than the DataModule's): `text` column, `train` and `validation`."""

    def fingerprint(self, cache_dir: str) -> str:
        """What keys the caches (tokenizer, prepared rows), found without reading the text (file stats, a hub name)."""
        ...

    def load(self, seed: int, cache_dir: str) -> tuple[Any, str]:
        """(datasets.DatasetDict, the same fingerprint)."""
        ...


@runtime_checkable
class TokenizerBuilder(Protocol):
    """Makes the tokenizer: a `PreTrainedTokenizerFast` with pad, bos, eos and mask tokens."""

    def __call__(self, texts: Any = None, cache_dir: str | None = None, fingerprint: str = "") -> Any: ...


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The attributes and methods of `protocol` that `obj` lacks (Protocol's own bookkeeping excluded)."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls in (Protocol, object) or not getattr(cls, "_is_protocol", False):
            continue
        names |= set(getattr(cls, "__annotations__", {}))
        names |= {k for k, v in vars(cls).items() if callable(v) and (not k.startswith("_") or k == "__call__")}
    return sorted(n for n in names if not hasattr(obj, n))


def check_contract(obj: Any, protocol: type, what: str) -> None:
    """One line naming what a component lacks, at build time rather than mid-training."""
    missing = missing_members(obj, protocol)
    if missing:
        raise DiffuseError(f"{what} ({type(obj).__name__}) does not meet the {protocol.__name__} contract of "
                           f"diffuse/contracts.py: missing {', '.join(missing)}")


def is_autoregressive(objective: Objective) -> bool:
    """Exact left-to-right likelihood and one step per token (not the same as `causal`: a block-causal
    diffusion model attends causally across blocks and still has a noise process)."""
    return objective.process == AUTOREGRESSIVE


def has_noise_process(objective: Objective) -> bool:
    """Whether the objective gives every noising hook (the autoregressive objective does not)."""
    return isinstance(objective, NoiseProcess)


def missing_hooks(objective: Any) -> list[str]:
    """The noising hooks `objective` lacks, in NOISING_HOOKS order."""
    missing = set(missing_members(objective, NoiseProcess))
    return [h for h in NOISING_HOOKS if h in missing]


def block_size_of(objective: Any) -> int | None:
    """The objective's block size: None for a full-sequence model and for objectives that are not Blockwise."""
    return objective.block_size if isinstance(objective, Blockwise) else None


def new_cache(backbone: Any, max_length: int) -> Any:
    """A fresh cache of a Cached backbone; None for a backbone without one (it re-runs its prefix)."""
    return backbone.new_cache(max_length=max_length) if isinstance(backbone, Cached) else None


def component_name(component: Any) -> str:
    """The name a component is registered under (the registry sets `registry_name` on its class), else its
    class name (a test stub, an object built by hand)."""
    return getattr(type(component), "registry_name", type(component).__name__)
