"""`python -m diffuse.evaluate ckpt=PATH [data=…] [steps=[…]] [judge=…]` — how good is a checkpoint?

Likelihood on held-out data (val/nelbo, val/bpt, val/ppl, standard errors, accuracy by corruption
level) and the quality of its samples (gen-PPL under a judge beside entropy and distinct-n, against
real text as the reference line). Everything printed is also in `eval.json` in the output dir; a
steps list also writes `sweep.json` and `sweep.png`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import one_line_errors
from diffuse.evaluation.formatting import format_result, write_json
from diffuse.evaluation.judges import build_judge
from diffuse.evaluation.progress import ProgressBar
from diffuse.evaluation.runner import (
    eval_data_config,
    evaluate_checkpoint,
    load_checkpoint,
)
from diffuse.evaluation.sweep import plot_curves
from diffuse.run.build import as_dict
from diffuse.run.entry import overridden_data_keys, pick_device, sampler_knobs


@one_line_errors
def evaluate(cfg: DictConfig) -> dict:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    ckpt = load_checkpoint(cfg.ckpt, device)
    judge = build_judge(cfg.judge, cfg.judge_model, device, candidates=[(f"self ({cfg.ckpt})", ckpt.module, ckpt.tokenizer)])
    data_cfg = eval_data_config(as_dict(ckpt.cfg.data), as_dict(cfg.get("data")), overridden_data_keys())
    with ProgressBar(cfg.progress) as bar:
        result = evaluate_checkpoint(ckpt, cfg, data_cfg, judge, cfg.paths.cache_dir, track=bar.track)
    if cfg.get("steps") is not None and not isinstance(cfg.steps, int) and "sweep" in result:
        write_json(out_dir / "sweep.json", {"ckpt": ckpt.path, "judge": result["judge"], "points": result["sweep"],
                                            "reference": result["reference"]})
        plot_curves({Path(ckpt.path).parent.parent.name or ckpt.path: result["sweep"]}, out_dir / "sweep.png",
                    result["reference"], title=f"{ckpt.objective}: steps vs quality")
        result["files"] = ["sweep.json", "sweep.png"]
    print(format_result(result))
    write_json(out_dir / "eval.json", result)
    print(f"written to {out_dir / 'eval.json'}")
    return result


@sampler_knobs
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
