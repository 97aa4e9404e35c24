"""Teacher trajectories for CDLM, recorded once before the student trains (the paper records them offline).

The teacher (a full-sequence masked model) decodes `gen_length` tokens after [BOS, prompt] in blocks of
`block_size`, one token a step, low-confidence remasking inside the current block: each step draws a token
for every masked position of the block (temperature τ, Gumbel-max) and commits the one it is most
confident of. A trajectory keeps, for each generated position, the step of its block at which it was
committed (`rank`, 0 … b−1) and the teacher's distribution it was drawn from there (its top-k log-probs,
renormalised): any intermediate state of the decoding is the prompt plus the positions of lower rank.

Rows are laid out for a block-causal student whose blocks are cut from position 0: the prompt is
left-padded so that the generation starts on a block boundary (`lead` columns; padding has segment 0).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from diffuse.contracts import block_size_of
from diffuse.errors import DiffuseError
from diffuse.evaluation.progress import ProgressBar
from diffuse.run.checkpoint import AtomicCheckpointIO, safe_load
from diffuse.sampling.base import row_generators, sample_tokens


def lead_width(prompt_length: int, block_size: int) -> int:
    """Columns before the generation: BOS + prompt, left-padded to a multiple of the block size."""
    return math.ceil((1 + prompt_length) / block_size) * block_size


@torch.no_grad()
def record(module, prompts: list[list[int]], gen_length: int, block_size: int, top_k: int = 32,
           temperature: float = 1.0, batch_size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Trajectories of `module` (a DiffusionLM, full-sequence absorbing objective) from `prompts` (one per
    trajectory, all of one length): a dict of tensors (see the module docstring)."""
    objective, backbone = module.objective, module.backbone
    if block_size_of(objective) is not None:
        raise DiffuseError("method=cdlm records trajectories with a full-sequence teacher; this teacher has "
                           f"objective.block_size={objective.block_size} (use its full-sequence parent)")
    if gen_length % block_size:
        raise DiffuseError(f"method.gen_length={gen_length} must be a multiple of method.block_size={block_size}")
    if len({len(p) for p in prompts}) > 1:
        raise DiffuseError("method=cdlm: all prompts must have one length (method.prompt_length)")
    special = objective.special
    device = next(backbone.parameters()).device
    P = len(prompts[0]) if prompts else 0
    lead = lead_width(P, block_size)
    width = lead + gen_length
    out = {"tokens": [], "rank": [], "top_ids": [], "top_logp": []}
    backbone.eval()
    chunks = range(0, len(prompts), batch_size)
    with ProgressBar(progress) as bar:
        for start in bar.track(chunks, total=len(chunks), description="teacher trajectories"):
            heads = [[special.bos, *p] for p in prompts[start:start + batch_size]]
            n = len(heads)
            x = torch.full((n, width), special.mask, dtype=torch.long, device=device)
            x[:, : lead - 1 - P] = special.pad
            x[:, lead - 1 - P: lead] = torch.tensor(heads, device=device)
            seg = (x != special.pad).long()
            batch = {"input_ids": x, "segment_ids": seg}
            rank = torch.zeros(n, gen_length, dtype=torch.long, device=device)
            top_ids = torch.zeros(n, gen_length, top_k, dtype=torch.int32, device=device)
            top_logp = torch.zeros(n, gen_length, top_k, dtype=torch.float16, device=device)
            gens = row_generators(seed + start, n, device)
            rows = torch.arange(n, device=device)
            for lo in range(lead, width, block_size):
                for step in range(block_size):
                    t = ((x[:, lead:] == special.mask).float().mean(1, keepdim=True)).clamp_min(objective.eps)
                    logp = objective.predict(backbone, x, t, batch)
                    if temperature != 1.0 and temperature > 0:
                        logp = (logp / temperature).log_softmax(-1)
                    proposal = sample_tokens(logp, 1.0 if temperature > 0 else 0.0, gens)  # logp is tempered already
                    conf = logp.gather(-1, proposal[..., None]).squeeze(-1)
                    eligible = torch.zeros_like(x, dtype=torch.bool)
                    eligible[:, lo: lo + block_size] = True
                    pos = conf.masked_fill(~(eligible & (x == special.mask)), float("-inf")).argmax(1)  # [n]
                    x[rows, pos] = proposal[rows, pos]
                    rank[rows, pos - lead] = step
                    top = logp[rows, pos].topk(top_k, dim=-1)
                    top_ids[rows, pos - lead] = top.indices.int()
                    top_logp[rows, pos - lead] = top.values.log_softmax(-1).half()  # renormalised over the top k
            out["tokens"].append(x.cpu())
            out["rank"].append(rank.cpu())
            out["top_ids"].append(top_ids.cpu())
            out["top_logp"].append(top_logp.cpu())
    result = {k: torch.cat(v) for k, v in out.items()}
    result.update(lead=lead, block_size=block_size, gen_length=gen_length, prompt_length=P)
    return result


def save(trajectories: dict, path: Path) -> None:
    AtomicCheckpointIO().save_checkpoint(trajectories, path)


def load(path: str) -> dict:
    """A trajectories file (tensors and ints only: loaded with weights_only, like every checkpoint)."""
    if not Path(path).is_file():
        raise DiffuseError(f"method.trajectories={path} does not exist")
    data = safe_load(path, "method.trajectories")
    missing = [k for k in ("tokens", "rank", "top_ids", "top_logp", "lead", "block_size") if k not in data]
    if missing:
        raise DiffuseError(f"method.trajectories={path} is not a trajectories file (no {', '.join(missing)})")
    return data
