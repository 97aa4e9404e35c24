"""`python -m diffuse.distill teacher=CKPT method=sdtt rounds=R` — few-step students from a trained teacher.

Each round is an ordinary `diffuse.train` run in `<out>/round<r>/`: the student starts from the round's
teacher (`init_from`), inherits its model, objective, schedule, tokenizer, data and seed, and trains with
the method's loss (`distill` in its config; diffuse/distillation). Its checkpoint is an ordinary diffuse
checkpoint whose sampler already has the student's steps: sample / evaluate / export / compare take it, and
never load the teacher. A round that finished (metrics.json) is kept; one that stopped resumes.

    sdtt   R rounds; round r's teacher is round r−1's student, and its steps halve: steps=64 gives 32, 16, …
    cdlm   teacher trajectories recorded once (<out>/round1/trajectories.pt), then one block-causal student
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from diffuse.core.paths import CONFIG_DIR
from diffuse.errors import DiffuseError, one_line_errors
from diffuse.evaluation.end_of_run import print_samples
from diffuse.registry import DISTILLERS
from diffuse.run.build import as_dict
from diffuse.run.checkpoint import read_checkpoint, stored_config
from diffuse.run.fit import train_in

log = logging.getLogger("diffuse")

# what a student takes from its teacher (the rest — trainer, optim, callbacks, logger — is the train defaults
# plus `overrides`); its regularizers are dropped: the method's loss is the whole training loss
INHERITED = ("model", "objective", "schedule", "tokenizer", "data", "seed", "sampler")


def student_config(teacher_cfg: dict, cfg: DictConfig, run_dir: Path, init_from: str, distill: dict,
                   changes: dict) -> DictConfig:
    """A round's train config: the train defaults with `overrides`, the teacher's components, then the
    round's `changes` (dotted keys), and the `overrides` that touch the inherited components again."""
    overrides = list(cfg.overrides or [])
    student = compose(config_name="train", overrides=overrides)
    OmegaConf.set_struct(student, False)
    for key in INHERITED:
        if key in teacher_cfg:
            student[key] = teacher_cfg[key]
    student.regularizer, student.regularizers = {"name": "none"}, []
    student.trainer.max_steps = int(cfg.max_steps)
    student.optim.lr, student.optim.warmup_steps = float(cfg.lr), int(cfg.warmup_steps)
    for key, value in changes.items():  # a whole group (a dict) replaces the teacher's, keys do not mix
        OmegaConf.update(student, key, value, merge=not isinstance(value, dict))
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.key_or_group.split(".")[0] in INHERITED and not o.is_delete():  # the user's word wins
            OmegaConf.update(student, o.key_or_group, o.value(), merge=True)
    student.paths.output_dir = str(run_dir)
    student.init_from, student.distill = init_from, distill
    student.resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
    student.overwrite = not student.resume  # a round killed before its first checkpoint starts over
    return student


@one_line_errors
def distill(cfg: DictConfig) -> list[dict]:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    method = as_dict(cfg.method)
    distiller_cls = DISTILLERS.get(method.get("name", ""))
    teacher_cfg = stored_config(read_checkpoint(cfg.teacher, "teacher", mmap=True))
    if not teacher_cfg:
        raise DiffuseError(f"teacher={cfg.teacher} was not written by diffuse (no config inside)")
    summary = []
    for r, plan in enumerate(distiller_cls.rounds(cfg, method, teacher_cfg, out_dir), start=1):
        run_dir = out_dir / f"round{r}"
        done = run_dir / "metrics.json"
        if done.is_file():
            log.info("round %d: done already (%s)", r, done)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            plan.prepare(run_dir)
            student = student_config(teacher_cfg, cfg, run_dir, plan.init_from, plan.distill, plan.changes)
            (run_dir / ".hydra").mkdir(exist_ok=True)
            OmegaConf.save(student, run_dir / ".hydra" / "config.yaml")
            log.info("round %d/%s: %s", r, "?" if plan.total is None else plan.total, plan.describe)
            train_in(student, run_dir, report=print_samples)
        metrics = json.loads(done.read_text())
        summary.append({"round": r, "method": method["name"], "what": plan.describe,
                        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"), "steps": plan.steps,
                        "val/bpt": metrics.get("val/bpt"), "train/distill_loss": metrics.get("train/distill_loss")})
    (out_dir / "distill.json").write_text(json.dumps(summary, indent=1))
    print("| round | student | sampler steps | val/bpt | checkpoint |\n|---|---|---|---|---|")
    for s in summary:
        bpt = "n/a" if s["val/bpt"] is None else f"{s['val/bpt']:.4f}"  # a round run without validation
        print(f"| {s['round']} | {s['what']} | {s['steps']} | {bpt} | {s['checkpoint']} |")
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="distill")
def main(cfg: DictConfig) -> None:
    distill(cfg)


if __name__ == "__main__":
    main()
