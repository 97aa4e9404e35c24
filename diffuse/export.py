"""`python -m diffuse.export ckpt=PATH out=DIR [format=diffuse|llama|remote]` — a checkpoint as a Hugging Face folder.

format=diffuse (default): `model.safetensors` (the backbone's weights under their plain state-dict keys),
`diffuse_config.json` (the run config) and the tokenizer (`tokenizer.json` & co.); `load_exported(DIR)`
rebuilds the model from that folder alone, with identical logits.
format=llama: an `objective=autoregressive` transformer as a stock `LlamaForCausalLM` folder (config.json,
model.safetensors under Llama's keys, a tokenizer that starts every text with BOS as training did), which
transformers, lm-eval's `hf` model, vLLM and llama.cpp's converter load as it is, without diffuse.
format=remote: any transformer run (masked, block, hybrid, …) in the LLaDA / Dream convention: config.json with
`auto_map` and `mask_token_id`, the project's self-contained modeling file (models/portable/modeling_diffuse.py),
weights and tokenizer; `AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads it without diffuse.
format=diffusion_gemma: a model=diffusion_gemma run as transformers' DiffusionGemmaForBlockDiffusion folder, with
the run's sampler=entropy_bound settings as generation_config.json (models/portable/diffusion_gemma.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_file, save_model
from transformers import AutoTokenizer

from diffuse.core.paths import CONFIG_DIR
from diffuse.data.tokenizers import with_bos
from diffuse.errors import DiffuseError, one_line_errors
from diffuse.models.portable.diffusion_gemma import gemma_folder
from diffuse.models.portable.llama import llama_config, llama_state_dict
from diffuse.models.portable.remote import copy_modeling_file, remote_config, remote_state_dict
from diffuse.run.build import build_module
from diffuse.run.load import load_run

CONFIG_FILE = "diffuse_config.json"


def diffuse_folder(cfg, tokenizer, module, merge_lora: bool = False) -> Callable[[Path], None]:
    if merge_lora:  # the adapters folded into the base weights: a plain model=hf config and state dict
        if not (cfg.model.get("lora") and hasattr(module.backbone, "merge_lora")):
            raise DiffuseError(f"merge_lora=true, but this run has no LoRA adapters (model={cfg.model.get('name')}, "
                               f"model.lora={cfg.model.get('lora')})")
        module.backbone.merge_lora()
        cfg.model.lora = None

    def write(out_dir: Path) -> None:
        save_model(module.backbone, str(out_dir / "model.safetensors"))  # drops tied duplicates safely
        (out_dir / CONFIG_FILE).write_text(json.dumps(OmegaConf.to_container(cfg), indent=2))
        tokenizer.save_pretrained(str(out_dir))
    return write


def llama_folder(cfg, tokenizer, module, merge_lora: bool = False) -> Callable[[Path], None]:
    objective = module.objective.registry_name
    if objective != "autoregressive":
        raise DiffuseError(f"format=llama exports a causal LM (objective=autoregressive); this run is "
                           f"objective={objective}")
    special = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    config = llama_config(module.backbone, float(cfg.model.get("rope_base", 10_000.0)),
                          int(cfg.get("data", {}).get("seq_len", 2048)), special)
    weights = llama_state_dict(module.backbone)

    def write(out_dir: Path) -> None:
        config.save_pretrained(str(out_dir))
        save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        with_bos(tokenizer).save_pretrained(str(out_dir))
    return write


def remote_folder(cfg, tokenizer, module, merge_lora: bool = False) -> Callable[[Path], None]:
    special = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
               "mask": tokenizer.mask_token_id}
    config = remote_config(module.backbone, float(cfg.model.get("rope_base", 10_000.0)), module.objective.causal,
                           special, getattr(module.objective, "block_size", None))
    weights = remote_state_dict(module.backbone)

    def write(out_dir: Path) -> None:
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
        save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        copy_modeling_file(out_dir)
        with_bos(tokenizer).save_pretrained(str(out_dir))
    return write


def diffusion_gemma_folder(cfg, tokenizer, module, merge_lora: bool = False) -> Callable[[Path], None]:
    """model=diffusion_gemma as transformers' own DiffusionGemma folder (models/portable/diffusion_gemma.py)."""
    special = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    write_model = gemma_folder(module.backbone, special, getattr(module.sampler, "loop", None),
                               int(cfg.get("sample_length", 256)), cfg.model.get("name"))

    def write(out_dir: Path) -> None:
        write_model(out_dir)
        with_bos(tokenizer).save_pretrained(str(out_dir))  # diffuse's sampler puts BOS before every prompt
    return write


FORMATS = {"diffuse": diffuse_folder, "llama": llama_folder, "remote": remote_folder,
           "diffusion_gemma": diffusion_gemma_folder}


def export(ckpt: str, out: str, overwrite: bool = False, format: str = "diffuse", merge_lora: bool = False) -> Path:
    """Into `out`, which must be new or empty: files there that diffuse did not write are never replaced
    (`overwrite=true` replaces the export's own files in it). `merge_lora`: a model=hf run's LoRA adapters folded
    into its weights (format=diffuse: the other formats take backbones without adapters)."""
    if format not in FORMATS:
        raise DiffuseError(f"format={format} is not one of {', '.join(FORMATS)}")
    if merge_lora and format != "diffuse":
        raise DiffuseError(f"merge_lora=true goes with format=diffuse, where a model=hf run's adapters are written "
                           f"(format={format} writes none)")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DiffuseError(f"out={out} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DiffuseError(f"out={out} is not empty: give a new folder, or overwrite=true to write the export's "
                           "files into it (others there are kept)")
    cfg, tokenizer, module = load_run(ckpt)
    write = FORMATS[format](cfg, tokenizer, module, merge_lora)  # refuses what the format cannot hold before writing
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiffuseError(f"out={out} cannot be created ({err.strerror or type(err).__name__})") from None
    write(out_dir)
    return out_dir


def load_exported(folder: str):
    """(config, tokenizer, DiffusionLM) from a format=diffuse folder."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise DiffuseError(f"{folder} is not a diffuse export (no {CONFIG_FILE})")
    run_config = json.loads((folder / CONFIG_FILE).read_text())
    cfg = OmegaConf.create(run_config)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    module = build_module(cfg, tokenizer, run_config=run_config)
    load_model(module.backbone, str(folder / "model.safetensors"))
    return cfg, tokenizer, module.eval()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
@one_line_errors
def main(cfg: DictConfig) -> None:
    merge_lora = cfg.get("merge_lora", False)
    if not isinstance(merge_lora, bool):  # bool("false") is True: a typo would fold (or refuse) silently
        raise DiffuseError(f"merge_lora={merge_lora} must be true or false")
    path = export(cfg.ckpt, cfg.out, bool(cfg.get("overwrite", False)), str(cfg.get("format", "diffuse")),
                  merge_lora)
    print(f"exported to {path}")


if __name__ == "__main__":
    main()
