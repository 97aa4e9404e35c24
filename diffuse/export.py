"""`python -m diffuse.export ckpt=PATH out=DIR` — a checkpoint as a plain Hugging Face-style folder.

The folder holds `model.safetensors` (the backbone's weights under their plain state-dict keys),
`diffuse_config.json` (the run config) and the tokenizer (`tokenizer.json` & co.). `load_exported(DIR)`
rebuilds the model from that folder alone, with identical logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_model
from transformers import AutoTokenizer

from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import DiffuseError, one_line_errors
from diffuse.run.build import build_module
from diffuse.run.load import load_run

CONFIG_FILE = "diffuse_config.json"


def export(ckpt: str, out: str, overwrite: bool = False) -> Path:
    """Into `out`, which must be new or empty: files there that diffuse did not write are never replaced
    (`overwrite=true` replaces the export's own files in it)."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DiffuseError(f"out={out} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DiffuseError(f"out={out} is not empty: give a new folder, or overwrite=true to write the export's "
                           "files into it (others there are kept)")
    cfg, tokenizer, module = load_run(ckpt)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DiffuseError(f"out={out} cannot be created ({err.strerror or type(err).__name__})") from None
    save_model(module.backbone, str(out_dir / "model.safetensors"))  # drops tied duplicates safely
    (out_dir / CONFIG_FILE).write_text(json.dumps(OmegaConf.to_container(cfg), indent=2))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load_exported(folder: str):
    """(config, tokenizer, DiffusionLM) from an exported folder."""
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
    print(f"exported to {export(cfg.ckpt, cfg.out, bool(cfg.get('overwrite', False)))}")


if __name__ == "__main__":
    main()
