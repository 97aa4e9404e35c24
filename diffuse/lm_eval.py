"""`python -m diffuse.lm_eval ckpt=PATH tasks=[…]` — standard benchmarks (lm-evaluation-harness) on a checkpoint.

Runs lm-eval's `simple_evaluate` with the checkpoint as the `diffuse` model (diffuse/evaluation/lm_eval_model.py)
and writes into the run directory `results.json` (lm-eval's own results dict, the estimator choices under
"diffuse") and `lm_eval.md` (lm-eval's table, then the same choices). `task_dir=DIR` adds a folder of task yamls;
`local_tasks=FILE` writes three tasks built from a text file into the run directory (diffuse_cloze, diffuse_continue,
diffuse_text: evaluation/local_tasks.py); with `builtin_tasks=false` nothing else is indexed (offline).
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table
from omegaconf import DictConfig

from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import DiffuseError, one_line_errors
from diffuse.evaluation.lm_eval_model import DiffuseLM
from diffuse.evaluation.local_tasks import write_local_tasks
from diffuse.run.build import as_dict
from diffuse.run.entry import sampler_knobs


def task_names(tasks) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks or [])
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    if not names:
        raise DiffuseError("tasks= names no task: give tasks=NAME or tasks=[NAME,…]")
    return names


def task_manager(cfg, out_dir: Path) -> TaskManager:
    for key in ("builtin_tasks", "log_samples"):  # bool("false") is True: a typo would be taken as true
        if not isinstance(cfg.get(key), bool):
            raise DiffuseError(f"{key}={cfg.get(key)} must be true or false")
    folders = []
    if cfg.get("task_dir") is not None:
        if not Path(cfg.task_dir).is_dir():
            raise DiffuseError(f"task_dir={cfg.task_dir} is not a folder")
        folders.append(cfg.task_dir)
    if cfg.get("local_tasks") is not None:
        if not Path(cfg.local_tasks).is_file():
            raise DiffuseError(f"local_tasks={cfg.local_tasks} is not a file")
        folders.append(str(write_local_tasks(cfg.local_tasks, out_dir / "tasks")))
    if not folders and not cfg.builtin_tasks:
        raise DiffuseError("builtin_tasks=false needs task_dir=DIR (a folder of task yamls) or local_tasks=FILE")
    return TaskManager(include_path=folders or None, include_defaults=bool(cfg.builtin_tasks))


def markdown(results: dict, choices: dict) -> str:
    parts = [f"# lm-eval: {choices['ckpt']}\n", make_table(results)]
    if results.get("groups"):
        parts.append(make_table(results, "groups"))
    parts.append("## Estimator choices\n\n```json\n" + json.dumps(choices, indent=2, default=str) + "\n```\n")
    return "\n".join(parts)


@one_line_errors
def run(cfg: DictConfig) -> dict:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, manager = task_names(cfg.tasks), task_manager(cfg, out_dir)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        raise DiffuseError(f"tasks: {unknown[0]} is not a task lm-eval knows"
                           + (f" (did you mean {', '.join(near)}?)" if near else "")
                           + ("" if cfg.builtin_tasks else " among task_dir's (builtin_tasks=false)"))
    lm = DiffuseLM(ckpt=cfg.ckpt, batch_size=cfg.batch_size, mc_samples=cfg.mc_samples, seed=cfg.seed,
                   cfg_scale=cfg.cfg_scale, t_samples=cfg.t_samples, sampler=as_dict(cfg.get("sampler")),
                   steps=cfg.get("steps"), temperature=cfg.get("temperature"), device=cfg.device)
    tic = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=names, num_fewshot=cfg.get("num_fewshot"), limit=cfg.get("limit"),
                              task_manager=manager, log_samples=bool(cfg.log_samples), random_seed=cfg.seed,
                              numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                              fewshot_random_seed=cfg.seed)
    results["diffuse"] = {**lm.choices, "evaluation_seconds": round(time.perf_counter() - tic, 2)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    table = markdown(results, results["diffuse"])
    (out_dir / "lm_eval.md").write_text(table)
    print(table)
    print(f"written to {out_dir / 'results.json'} and {out_dir / 'lm_eval.md'}")
    return results


@sampler_knobs
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="lm_eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
