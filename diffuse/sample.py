"""`python -m diffuse.sample ckpt=PATH` — generate text from a trained checkpoint.

Prints each sample with its length and forward passes (NFE) and writes `samples.jsonl` to the output dir.

A canvas (BOS + prompt + `length`) longer than the rows the model was trained on (the checkpoint's
`data.seq_len`) is refused in one line: positions past it were never trained (a RoPE transformer or
Mamba-2 runs there, with unknown quality). `+beyond_context=true` samples past it anyway, with a warning.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import DiffuseError, one_line_errors
from diffuse.run.build import build_sampler
from diffuse.run.entry import check_context, pick_device, sampler_knobs, sampler_spec
from diffuse.run.load import load_run


def encode_prompts(cfg, tokenizer) -> list[list[int]]:
    prompts = cfg.get("prompt")
    if prompts is None:
        return [[] for _ in range(cfg.num_samples)]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = [prompts[i % len(prompts)] for i in range(cfg.num_samples)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@one_line_errors
def sample(cfg: DictConfig) -> list[dict]:
    if cfg.num_samples <= 0 or cfg.length <= 0:
        raise DiffuseError(f"num_samples={cfg.num_samples} and length={cfg.length} must be positive")
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    train_cfg, tokenizer, module = load_run(cfg.ckpt)
    module.to(pick_device(cfg.device))
    sampler = build_sampler(sampler_spec(cfg, train_cfg, module.objective), module.objective)
    prompts = encode_prompts(cfg, tokenizer)
    check_context(train_cfg, prompts, int(cfg.length), bool(cfg.get("beyond_context", False)), sampler)
    records = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        tic = time.perf_counter()
        out = module.generate(chunk, cfg.length, seed=cfg.seed + start, sampler=sampler)
        seconds = (time.perf_counter() - tic) / len(chunk)
        alone = out.nfe_per_row().tolist()
        for i, (row, n) in enumerate(zip(out.tokens.tolist(), out.lengths.tolist())):
            prompt_text = tokenizer.decode(chunk[i], skip_special_tokens=True)
            text = tokenizer.decode(row[:n], skip_special_tokens=True)
            records.append({"index": start + i, "prompt": prompt_text, "text": text, "length": n, "nfe": out.nfe,
                            "nfe_alone": alone[i], "seconds": seconds, "sampler": sampler.registry_name})
            batch = f", {out.nfe} for its batch" if alone[i] != out.nfe else ""
            print(f"--- sample {start + i} ({n} tokens, {alone[i]} forward passes{batch}) ---\n{prompt_text}{text}")
    with open(out_dir / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"samples written to {out_dir / 'samples.jsonl'}")
    return records


@sampler_knobs
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
