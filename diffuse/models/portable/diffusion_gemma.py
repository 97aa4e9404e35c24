"""export format=diffusion_gemma: a model=diffusion_gemma run as the folder transformers itself reads
(`DiffusionGemmaForBlockDiffusion.from_pretrained` + `generate`, no diffuse): config.json with the tokenizer's
special ids, the weights under transformers' own keys (the backbone *is* transformers' class, so nothing is
renamed), and generation_config.json holding the run's sampler=entropy_bound settings, so a plain `generate` under
`torch.manual_seed(seed)` gives the tokens diffuse's sampler gives with `seed` (tests/test_diffusion_gemma.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

from diffuse.errors import DiffuseError
from diffuse.models.diffusion_gemma import DiffusionGemma


def generation_config(loop, special: dict, max_new_tokens: int) -> DiffusionGemmaGenerationConfig:
    """sampler=entropy_bound's settings (its EntropyBoundLoop) in transformers' names."""
    early = loop.early_stop
    return DiffusionGemmaGenerationConfig(
        max_new_tokens=int(max_new_tokens), max_denoising_steps=int(loop.steps),
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(loop.gamma)),
        t_min=float(loop.t_min), t_max=float(loop.t_max),
        stability_threshold=int(loop.stable) if early else None,
        confidence_threshold=float(loop.confidence) if early else None,
        bos_token_id=special["bos"], pad_token_id=special["pad"], eos_token_id=special["eos"])


def gemma_folder(backbone, special: dict, loop, max_new_tokens: int, model_name: str) -> Callable[[Path], None]:
    """A writer of the folder (module docstring) for `backbone`; refuses in one line what is not DiffusionGemma."""
    if not isinstance(backbone, DiffusionGemma):
        raise DiffuseError(f"format=diffusion_gemma exports a model=diffusion_gemma run; this run is model={model_name}")
    if loop is None:
        raise DiffuseError("format=diffusion_gemma writes sampler=entropy_bound's settings as generation_config.json; "
                           "this run decodes with another sampler")
    model = copy.deepcopy(backbone.model)  # the run's module stays as it was
    text = model.config.text_config
    text.bos_token_id, text.pad_token_id, text.eos_token_id = special["bos"], special["pad"], special["eos"]
    model.generation_config = generation_config(loop, special, max_new_tokens)

    def write(out_dir: Path) -> None:
        model.save_pretrained(str(out_dir))
    return write
