"""Peak memory, loss and speed of one training step: full-vocabulary logits (the old path) vs the head and
cross-entropy on the loss positions only, chunked (objectives/losses.py, the path `loss` now takes).

    python experiments/bench/loss_memory.py [--vocab 32000] [--batch 4] [--seq-len 512] [--d-model 256]
                                            [--n-layers 2] [--steps 3] [--threads 1]

One step = forward + backward of `objective.loss(...).loss` (train=True, a fixed generator) for
masked_discrete, llada and autoregressive on diffuse.models.transformer (tied embedding and head, the
default), random tokens with one BOS per row. Not a test: it prints one line per (objective, path).

Memory, in units of one fp32 B×L×V tensor (B·L·V·4 bytes), measured two ways:
  live   — a TorchDispatchMode sees every tensor an ATen op returns during the step (forward and backward,
           parameter .grad included) and keeps the bytes of the new storages alive (an output sharing an
           input's storage — a view, an in-place op — is not new; a weakref finalizer per storage subtracts
           it when freed): the peak of live tensor bytes. Scratch memory a kernel allocates inside itself
           is not seen.
  rss    — the same step in a fresh interpreter with MALLOC_MMAP_THRESHOLD_=65536 (glibc returns every
           freed block ≥ 64 kB to the OS at once), after one warm-up step: the peak RSS of the step (VmHWM,
           reset just before it through /proc/self/clear_refs) minus the RSS just before it. Sees
           everything, kernel scratch and allocator slack included.
The old path is kept below as it was (SUBS log-probabilities with a one-hot, or full AR logits); both
paths draw t and the masks from the same generator, so their losses must agree to float rounding.
tokens/s: B·L / the median wall time of `--steps` steps after one warm-up, in this process.

Measured on a shared 2-core CPU, 1 thread, defaults (live / rss in units, tokens/s):
  masked_discrete  old 5.44 / 5.44,  458   new 0.82 / 0.82, 1497   loss rel. diff 0
  llada            old 5.44 / 5.44,  440   new 0.82 / 0.82, 1560   loss rel. diff 9e-8
  autoregressive   old 4.44 / 4.44,  483   new 0.83 / 0.83,  807   loss rel. diff 9e-8
(the new peaks include everything the step holds: the backbone's activations, ≈ 0.45, and the
head's gradient; gradients agree to < 1e-6 of their largest entry).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diffuse.models.transformer import Transformer
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.base import SpecialTokens, predicted_token_stats
from diffuse.objectives.llada import LLaDA
from diffuse.objectives.masked_discrete import MaskedDiscrete
from diffuse.schedules import build_schedule


# -- the old path (full [B, L, V] logits), as the objectives computed it before ------------------------
def old_subs_log_probs(objective, backbone, z, t, batch):
    t_in = t.squeeze(-1) if t.dim() == 2 and t.shape[1] == 1 else t
    logits = backbone.logits(backbone(ids=z, t=t_in, segment_ids=batch.get("segment_ids"))).float()
    logits[..., objective.special.mask] = float("-inf")
    logp = logits.log_softmax(-1)
    keep = z != objective.special.mask
    return torch.where(keep[..., None], F.one_hot(z, logp.shape[-1]).float().log(), logp)


def old_absorbing_loss(objective, backbone, batch, generator):
    x0 = batch["input_ids"]
    t = objective.sample_t(x0, generator, True)
    z = objective.corrupt(x0, t, objective.draw_noise(x0, generator), batch)
    logp = old_subs_log_probs(objective, backbone, z, t, batch)
    masked, maskable = z == objective.special.mask, objective.maskable(batch)
    ce = torch.where(masked, -logp.gather(-1, x0[..., None]).squeeze(-1), 0.0)
    if isinstance(objective, LLaDA):  # Σ_masked CE/p ÷ #maskable (importance weighting on, no prompt)
        loss = (ce / objective.mask_prob(t).float()).sum() / maskable.sum().clamp_min(1)
    else:  # the NELBO: Σ_masked weight·CE ÷ #maskable
        weight = objective.schedule.weight(t).expand_as(ce) * (1.0 - objective.eps)
        loss = (ce * weight)[masked].sum() / maskable.sum().clamp_min(1)
    predicted_token_stats(logp, x0, masked)
    return loss


def old_ar_loss(objective, backbone, batch, generator):
    ids, seg = batch["input_ids"], batch["segment_ids"]
    logits = backbone.logits(backbone(ids=ids, segment_ids=seg, causal=True))[:, :-1].float()
    logits[..., objective.special.mask] = float("-inf")
    targets = ids[:, 1:]
    where = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    predicted_token_stats(logits, targets, where)
    return nll[where].sum() / where.sum().clamp_min(1)


# -- measuring -----------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive, counting those created while the mode is on."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self.live and id(storage) not in inputs and storage.nbytes():
                    self.live[id(storage)] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, id(storage))
        return out


def setup(args, objective_name):
    torch.manual_seed(0)
    special = SpecialTokens(pad=0, bos=1, eos=2, mask=3)
    model = Transformer(args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=4).train()
    objective = {"masked_discrete": lambda: MaskedDiscrete(build_schedule("linear"), special),
                 "llada": lambda: LLaDA(special, build_schedule("linear")),
                 "autoregressive": lambda: Autoregressive(special)}[objective_name]()
    ids = torch.randint(4, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = special.bos
    batch = {"input_ids": ids, "segment_ids": torch.ones_like(ids)}
    return model, objective, batch


def step(model, objective, batch, path):
    gen = torch.Generator().manual_seed(123)
    if path == "new":
        loss = objective.loss(model, batch, gen, train=True).loss
    elif isinstance(objective, Autoregressive):
        loss = old_ar_loss(objective, model, batch, gen)
    else:
        loss = old_absorbing_loss(objective, model, batch, gen)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def rss_case(args, objective_name, path) -> float:
    """Run in a fresh interpreter (see the module docstring): peak RSS over the step, bytes."""
    model, objective, batch = setup(args, objective_name)
    step(model, objective, batch, path)
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
    before = status_bytes("VmRSS")
    step(model, objective, batch, path)
    return status_bytes("VmHWM") - before


def measure(args, objective_name, path) -> dict:
    unit = args.batch * args.seq_len * args.vocab * 4
    model, objective, batch = setup(args, objective_name)
    loss = step(model, objective, batch, path)  # warm-up
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with LiveBytes() as mode:
        step(model, objective, batch, path)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(model, objective, batch, path)
        times.append(time.perf_counter() - start)
    cmd = [sys.executable, __file__, "--rss-case", objective_name, path, *sys.argv[1:]]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rss = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)["rss"]
    return {"live": mode.peak / unit, "rss": rss / unit, "loss": float(loss), "grads": grads,
            "tok_s": args.batch * args.seq_len / statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--objectives", nargs="+", default=["masked_discrete", "llada", "autoregressive"])
    parser.add_argument("--rss-case", nargs=2, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    if args.rss_case:
        print(json.dumps({"rss": rss_case(args, *args.rss_case)}))
        return
    unit = args.batch * args.seq_len * args.vocab * 4
    print(f"V={args.vocab} B={args.batch} L={args.seq_len} transformer d={args.d_model} x{args.n_layers} "
          f"(tied head), {args.threads} thread(s), torch {torch.__version__}; unit = one fp32 BxLxV tensor = "
          f"{unit / 2**20:.0f} MiB")
    print(f"{'objective':16} {'path':4} {'live':>6} {'rss':>6} {'loss':>12} {'rel.diff':>9} {'grad diff':>9} "
          f"{'tokens/s':>9}")
    for name in args.objectives:
        old = measure(args, name, "old")
        new = measure(args, name, "new")
        rel = abs(new["loss"] - old["loss"]) / abs(old["loss"])
        grad = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(new["grads"], old["grads"]))
        for path, r in (("old", old), ("new", new)):
            extra = f"{rel:9.1e} {grad:9.1e}" if path == "new" else f"{'':9} {'':9}"
            print(f"{name:16} {path:4} {r['live']:6.2f} {r['rss']:6.2f} {r['loss']:12.6f} {extra} {r['tok_s']:9.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
