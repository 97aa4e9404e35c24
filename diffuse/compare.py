"""`python -m diffuse.compare a=CKPT b=CKPT [steps=[…]]` — is B faster than A at the same quality?

Evaluates both checkpoints on the same held-out data with the same judge and seeds (see
diffuse.evaluate), then searches the fewest steps at which B reaches A's gen-PPL within `tolerance`
(diffuse/evaluation/sweep.py documents the rule). Writes comparison.md, comparison.json, comparison.png.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import one_line_errors
from diffuse.evaluation.comparison import render_markdown, training_budget
from diffuse.evaluation.formatting import write_json
from diffuse.evaluation.judges import build_judge
from diffuse.evaluation.progress import ProgressBar
from diffuse.evaluation.runner import (
    eval_data_config,
    evaluate_checkpoint,
    load_checkpoint,
)
from diffuse.evaluation.sweep import plot_curves, speedup
from diffuse.run.build import as_dict
from diffuse.run.entry import overridden_data_keys, pick_device, sampler_knobs


@one_line_errors
def compare(cfg: DictConfig) -> dict:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    a, b = load_checkpoint(cfg.a, device, key="a"), load_checkpoint(cfg.b, device, key="b")
    judge = build_judge(cfg.judge, cfg.judge_model, device,
                        candidates=[(f"A ({cfg.a})", a.module, a.tokenizer), (f"B ({cfg.b})", b.module, b.tokenizer)])
    data_cfg = eval_data_config(as_dict(a.cfg.data), as_dict(cfg.get("data")), overridden_data_keys())
    settings = OmegaConf.merge(cfg, {"seed": cfg.seed if cfg.seed is not None else int(a.cfg.get("seed", 0))})
    notes = []
    if a.tokenizer.backend_tokenizer.to_str() != b.tokenizer.backend_tokenizer.to_str():
        notes.append("A and B use different tokenizers: their bits/token are per their own tokens, not comparable")
    if judge is not None and judge.name.startswith(("A (", "B (")):
        notes.append(f"the judge is one of the compared models ({judge.name}): its own samples are favoured")
    if a.autoregressive and cfg.reference_steps is not None:
        notes.append("reference_steps is ignored: A is autoregressive (one point, NFE = length)")

    results = {}
    with ProgressBar(cfg.progress) as bar:
        for name, ckpt in (("a", a), ("b", b)):
            results[name] = evaluate_checkpoint(ckpt, settings, data_cfg, judge, cfg.paths.cache_dir, track=bar.track)
            results[name]["budget"] = training_budget(ckpt.path)
    found = speedup(results["a"].get("sweep", []), results["b"].get("sweep", []),
                    None if a.autoregressive else cfg.reference_steps, float(cfg.tolerance)) if cfg.num_samples > 0 else {
                        "found": False, "reason": "num_samples=0", "tolerance": float(cfg.tolerance)}
    comparison = {"a": results["a"], "b": results["b"], "speedup": found, "judge": getattr(judge, "name", None),
                  "settings": {k: OmegaConf.to_container(cfg)[k] for k in ("steps", "num_samples", "length", "tolerance",
                                                                        "t_samples", "limit_batches")},
                  "notes": notes + results["a"]["notes"] + results["b"]["notes"]}
    if cfg.num_samples > 0:
        plot_curves({f"A: {a.objective}": results["a"]["sweep"], f"B: {b.objective}": results["b"]["sweep"]},
                    out_dir / "comparison.png", results["a"].get("reference"), title="A vs B: steps vs quality")
    markdown = render_markdown(comparison)
    (out_dir / "comparison.md").write_text(markdown)
    write_json(out_dir / "comparison.json", comparison)
    print(markdown)
    print(f"written to {out_dir / 'comparison.md'}")
    return comparison


@sampler_knobs
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
def main(cfg: DictConfig) -> None:
    compare(cfg)


if __name__ == "__main__":
    main()
