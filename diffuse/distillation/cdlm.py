"""CDLM (arXiv 2511.19269) as the paper does it: a block-causal student trained on its teacher's recorded
trajectories (trajectories.py), then decoded with threshold (parallel) commits and the exact block cache
(`sampler=block threshold=τ`).

A training step takes B trajectories and, in every generated block independently (the block-causal layout
makes each block's noisy copy see only the clean blocks before it, as when the teacher decoded it), two
states of the teacher's decoding of that block: y at step j ~ U{0 … b−1} (the positions of rank < j
committed) and a later one y⁺ at step j⁺ ~ U{j+1 … b} (j⁺ = b: the block complete). Then

    distillation   KL(teacher ‖ student(y)) at the position the teacher committed next (rank j), on the
                   teacher's top-k distribution recorded there
    consistency    KL(stopgrad student(y⁺) ‖ student(y)) on the positions masked in y: toward the
                   block-completion state (where y⁺ has committed a position its target is that token)
    diffusion      the objective's own loss on a batch of real data (keeps the student a diffusion model)

    loss = w_d · distillation + w_c · consistency + w_dlm · diffusion

`regularizer=cdlm_consistency` is another thing: teacher-free self-consistency between two noise
levels of one corruption, added to ordinary training (diffuse/regularizers/cdlm_consistency.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from diffuse.contracts import Absorbing, block_size_of, check_contract
from diffuse.core.checks import check_range
from diffuse.core.noise import batch_draw
from diffuse.distillation import trajectories as traj
from diffuse.distillation.plan import Round
from diffuse.errors import DiffuseError
from diffuse.objectives.base import LossOutput
from diffuse.registry import DISTILLERS
from diffuse.run.build import build_datamodule
from diffuse.run.entry import pick_device
from diffuse.run.load import load_run


def randint_rows(hi: torch.Tensor | int, shape, generator, device) -> torch.Tensor:
    """Uniform integers in [0, hi) (hi a tensor of the shape, or an int), from the batch's noise stream."""
    u = batch_draw(torch.rand, shape, generator, device=device)
    return (u * hi).long().clamp_max(torch.as_tensor(hi, device=device) - 1)


@DISTILLERS.register("cdlm")
class CDLM(nn.Module):
    # keys of conf/method/cdlm.yaml read by the round plan (the recording, the student's sampler), not the loss
    plan_keys = ("num_trajectories", "gen_length", "prompt_length", "top_k", "temperature", "threshold")

    def __init__(self, objective, trajectories: str, block_size: int, teacher: str | None = None,
                 distill_weight: float = 1.0, consistency_weight: float = 1.0, dlm_weight: float = 1.0):
        super().__init__()
        if block_size_of(objective) != block_size:
            raise DiffuseError(f"method=cdlm trains a block-causal student: objective.block_size="
                               f"{block_size_of(objective)} must equal method.block_size={block_size}")
        check_contract(objective, Absorbing, "method=cdlm's objective")
        for key, w in (("distill_weight", distill_weight), ("consistency_weight", consistency_weight),
                       ("dlm_weight", dlm_weight)):
            if not w >= 0:
                raise DiffuseError(f"method.{key}={w} must be ≥ 0")
        data = traj.load(trajectories)
        if int(data["block_size"]) != block_size:
            raise DiffuseError(f"method.trajectories={trajectories} was recorded with blocks of {data['block_size']}, "
                               f"not method.block_size={block_size}")
        self.data = {k: v for k, v in data.items()}  # plain tensors, not buffers: not in the student's checkpoint
        self.block_size = block_size  # `teacher` (the checkpoint the trajectories came from) names it in the run config only
        self.weights = (float(distill_weight), float(consistency_weight), float(dlm_weight))
        self.global_step = 0
        # t of a block with m of its b positions masked (an untimed backbone ignores it)
        self.t_of = torch.tensor([objective.t_for_mask_prob(min(max(m / block_size, objective.eps), 1.0))
                                  for m in range(block_size + 1)])

    def states(self, objective, tokens, rank, step) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows at `step` [B, blocks] of every block: generated positions of rank ≥ step masked; and t."""
        lead, b = int(self.data["lead"]), self.block_size
        per_position = step.repeat_interleave(b, dim=1)  # [B, G]
        z = tokens.clone()
        z[:, lead:] = torch.where(rank >= per_position, objective.special.mask, tokens[:, lead:])
        t_gen = self.t_of.to(tokens.device)[b - per_position]  # b − step positions masked in the block
        t = torch.cat([torch.full_like(tokens[:, :lead], objective.eps, dtype=t_gen.dtype), t_gen], 1)
        return z, t.float()

    def loss(self, objective, backbone, batch, generator=None) -> LossOutput:
        device = batch["input_ids"].device
        n_rows = batch["input_ids"].shape[0]
        pick = randint_rows(self.data["tokens"].shape[0], (n_rows,), generator, device).cpu()
        tokens, rank = self.data["tokens"][pick].to(device), self.data["rank"][pick].to(device)
        top_ids = self.data["top_ids"][pick].to(device).long()
        top_logp = self.data["top_logp"][pick].to(device).float()
        rows = {"input_ids": tokens, "segment_ids": (tokens != objective.special.pad).long()}
        lead, b = int(self.data["lead"]), self.block_size
        n_blocks = rank.shape[1] // b
        j = randint_rows(b, (n_rows, n_blocks), generator, device)  # y: step j of each block
        j_later = j + 1 + randint_rows(b - j, (n_rows, n_blocks), generator, device)  # y⁺: in j+1 … b

        z, t = self.states(objective, tokens, rank, j)
        pred = objective.predict(backbone, z, t, rows)[:, lead:]  # [B, G, V]
        with torch.no_grad():
            z_later, t_later = self.states(objective, tokens, rank, j_later)
            target = objective.predict(backbone, z_later, t_later, rows)[:, lead:]

        following = rank == j.repeat_interleave(b, dim=1)  # the position the teacher committed next, per block
        teacher = top_logp[following]  # [n, k]
        student = pred[following].gather(-1, top_ids[following])
        distill = (teacher.exp() * (teacher - student)).sum(-1).mean()
        masked = z[:, lead:] == objective.special.mask
        consistency = objective.distance(pred, target, masked).sum() / masked.sum().clamp_min(1)
        dlm = objective.loss(backbone, batch, generator, train=True)
        w_d, w_c, w_dlm = self.weights
        total = w_d * distill + w_c * consistency + w_dlm * dlm.loss
        return LossOutput(loss=total, nll_sum=dlm.nll_sum, n_tokens=dlm.n_tokens,
                          metrics={"distill_loss": distill.detach(), "consistency_loss": consistency.detach(),
                                   "dlm_loss": dlm.loss.detach()},
                          token_correct=dlm.token_correct, token_confidence=dlm.token_confidence,
                          token_level=dlm.token_level)

    @classmethod
    def rounds(cls, cfg, method: dict, teacher_cfg: dict, out_dir) -> list[Round]:
        """One round: record the teacher's trajectories into the round's run dir, then train the student."""
        if int(cfg.rounds) != 1:
            raise DiffuseError(f"rounds={cfg.rounds}: method=cdlm trains one student (rounds=1)")
        check_plan(method)
        b = int(method["block_size"])
        teacher = str(cfg.teacher)
        path = Path(out_dir) / "round1" / "trajectories.pt"
        spec = {k: v for k, v in method.items() if k not in cls.plan_keys}

        def prepare(run_dir: Path) -> None:
            if not path.is_file():
                record_for(teacher, teacher_cfg, method, path)

        sampler = {"name": "block", "steps": b, "threshold": method.get("threshold"), "remasking": "low_confidence",
                   "temperature": 1.0, "use_cache": None}
        return [Round(init_from=teacher, distill={**spec, "teacher": teacher, "trajectories": str(path)},
                      changes={"objective.block_size": b, "sampler": sampler}, steps=b, total=1, prepare=prepare,
                      describe=f"CDLM student: blocks of {b}, threshold {method.get('threshold')}")]


def check_plan(method: dict) -> None:
    """The keys the round plan reads, checked before the teacher records anything (minutes later the student's
    sampler and objective would check some of them, after the recording)."""
    for key, low in (("block_size", 1), ("num_trajectories", 1), ("gen_length", 1), ("prompt_length", 0),
                     ("top_k", 1)):
        if key in method:
            check_range(f"method.{key}", method[key], low, integer=True)
    if "temperature" in method:
        check_range("method.temperature", method["temperature"], 0)
    if "threshold" in method:
        check_range("method.threshold", method["threshold"], 0, 1, low_open=True, null="k tokens per step")


def record_for(teacher: str, teacher_cfg: dict, method: dict, path: Path) -> None:
    """Record the trajectories `method` asks for from the teacher checkpoint into `path` (atomically)."""
    log = logging.getLogger("diffuse")
    device = pick_device("auto")
    _, tokenizer, module = load_run(teacher, key="teacher")
    module.to(device)
    n, P = int(method["num_trajectories"]), int(method.get("prompt_length", 0))
    prompts = training_prompts(teacher_cfg, tokenizer, n, P) if P else [[] for _ in range(n)]
    log.info("recording %d teacher trajectories of %d tokens (blocks of %d) into %s", n, method["gen_length"],
             method["block_size"], path)
    data = traj.record(module, prompts, int(method["gen_length"]), int(method["block_size"]),
                       top_k=int(method.get("top_k", 32)), temperature=float(method.get("temperature", 1.0)),
                       seed=int(teacher_cfg.get("seed", 0)))
    traj.save(data, path)


def training_prompts(teacher_cfg: dict, tokenizer, n: int, length: int) -> list[list[int]]:
    """The first `length` tokens (after BOS) of n training rows of the teacher's data."""
    cfg = OmegaConf.create(teacher_cfg)
    dm = build_datamodule(cfg, seed=int(cfg.get("seed", 0)), cache_dir=cfg.paths.cache_dir)
    dm.load(tokenizer)
    dm.setup("fit")
    bos = tokenizer.bos_token_id
    prompts = []
    for batch in dm.train_dataloader():
        for row in batch["input_ids"].tolist():
            row = row[1:] if row and row[0] == bos else row
            prompts.append(row[:length])
            if len(prompts) == n:
                return prompts
    raise DiffuseError(f"method.num_trajectories={n}: the teacher's data has fewer training rows")
