"""Training throughput (tokens/sec) of mamba2 vs transformer at the same width and depth.

    python experiments/bench/throughput.py [--seq-lens 256 1024] [--d-model 128] [--n-layers 4]
                                           [--batch 4] [--steps 5] [--warmup 2] [--device cpu|cuda]

One training step = forward, cross-entropy on random tokens, backward, AdamW update (bidirectional
models, as the diffusion objectives use them). Prints one line per (model, seq_len). Not a test.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffuse.registry import MODELS


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tokens_per_sec(name: str, seq_len: int, args, device: torch.device) -> tuple[float, int]:
    torch.manual_seed(0)
    model = MODELS.build({"name": name, "d_model": args.d_model, "n_layers": args.n_layers}, vocab_size=args.vocab)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, seq_len), device=device)
    segment_ids = torch.ones_like(ids)  # the data module always sends segment ids

    def step():
        logits = model.logits(model(ids=ids, segment_ids=segment_ids))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return args.steps * args.batch * seq_len / elapsed, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mamba2", "transformer"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device {device}{threads}; d_model {args.d_model}, n_layers {args.n_layers}, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    for seq_len in args.seq_lens:
        for name in args.models:
            rate, n_params = tokens_per_sec(name, seq_len, args, device)
            print(f"{name:12s} seq_len {seq_len:5d}  {n_params / 1e6:5.2f}M params  {rate:10.0f} tokens/sec")


if __name__ == "__main__":
    main()
