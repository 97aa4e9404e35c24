"""`python -m diffuse.sample ckpt=PATH` — generate text from a trained checkpoint.

Prints each sample with its length and forward passes (NFE) and writes `samples.jsonl` to the output dir.
`trace=out.html` (or `trace=true`: trace.html in the output dir) writes a self-contained page replaying the first
batch's trajectory step by step, `trace=out.gif` the first sample's as an animated picture (sampling/trace.py).

A canvas (BOS + prompt + `length`) longer than the rows the model was trained on (the checkpoint's
`data.seq_len`) is refused in one line: positions past it were never trained (a RoPE transformer or
Mamba-2 runs there, with unknown quality). `+beyond_context=true` samples past it anyway, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffuse.analysis.replay import page_html
from diffuse.analysis.replay_gif import write_gif
from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import DiffuseError, one_line_errors
from diffuse.run.build import build_sampler
from diffuse.run.entry import check_context, pick_device, sampler_knobs, sampler_spec
from diffuse.run.load import load_run
from diffuse.sampling.trace import recording


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
    trace_path = trace_target(cfg.get("trace"), out_dir)
    train_cfg, tokenizer, module = load_run(cfg.ckpt)
    module.to(pick_device(cfg.device))
    sampler = build_sampler(sampler_spec(cfg, train_cfg, module.objective), module.objective)
    prompts = encode_prompts(cfg, tokenizer)
    check_context(train_cfg, prompts, int(cfg.length), bool(cfg.get("beyond_context", False)), sampler)
    records = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        tic = time.perf_counter()
        with recording(sampler) if trace_path and start == 0 else contextlib.nullcontext() as traj:
            out = module.generate(chunk, cfg.length, seed=cfg.seed + start, sampler=sampler)
        seconds = (time.perf_counter() - tic) / len(chunk)
        if traj is not None:
            write_trace(trace_path, traj, tokenizer, module.objective.special, chunk, seconds * len(chunk))
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


TRACE_FORMATS = (".html", ".gif")


def trace_target(value, out_dir: Path) -> Path | None:
    """`trace=`: null/false (none), true (trace.html in the output dir), or a .html / .gif path."""
    if value is None or value is False:
        return None
    path = out_dir / "trace.html" if value is True else Path(str(value))
    if path.suffix not in TRACE_FORMATS:
        raise DiffuseError(f"trace={value} must be true or a path ending in {' or '.join(TRACE_FORMATS)}")
    return path


def write_trace(path: Path, traj, tokenizer, special, chunk, seconds: float) -> None:
    token = lambda i: tokenizer.decode([i])
    prompts = [tokenizer.decode(p, skip_special_tokens=True) for p in chunk]
    if not traj.steps:
        raise DiffuseError(f"trace={path}: sampler={traj.sampler} recorded no steps")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        write_gif(path, traj.steps, 0, token, special, prompts[0])
    else:
        path.write_text(page_html(traj.steps, range(len(chunk)), token, special, prompts,
                                  f"sampler={traj.sampler}", seconds))
    print(f"trajectory ({len(traj.steps)} steps) written to {path}")


@sampler_knobs
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
