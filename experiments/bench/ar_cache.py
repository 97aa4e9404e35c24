"""AR decoding throughput: the old growing KV cache (torch.cat every step) vs the static one.

    python experiments/bench/ar_cache.py [--d-model 256] [--n-layers 4] [--vocab 4096] [--length 256]
                                         [--batches 1 16] [--prompt 16] [--repeats 3] [--threads N]
                                         [--device cpu|cuda]

ARSampler (temperature 1) on a random transformer, EOS forbidden so every row generates `length`
tokens; tokens/s = batch x length / wall time (prefill included), best of `repeats` (the two caches
interleaved) after one warm-up.
Both caches run in the same process on the same model; the sampled tokens are checked to be equal.
Not a test.

Measured with `--threads 1` on a 2-core CPU box that had another process's training run on it (load
~3); with 2 threads the same contention gave numbers swinging 2x between runs, so read these as a
rough CPU figure, and measure on a GPU before concluding anything there:

    device=cpu threads=1 d_model=256 n_layers=4 vocab=4096 prompt=16 length=256 torch=2.13.0+cpu
    batch   1  growing (torch.cat)       193.8 tokens/s
    batch   1  static (in place)         194.7 tokens/s
    batch   1  static / growing = 1.00x   tokens identical: True
    batch  16  growing (torch.cat)      1023.0 tokens/s
    batch  16  static (in place)        1107.6 tokens/s
    batch  16  static / growing = 1.08x   tokens identical: True

At this size the per-step matmuls dominate; the torch.cat copy (O(length) per layer per step) shows
only at batch 16. No GPU run was made.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffuse.models.transformer import Transformer
from diffuse.objectives.autoregressive import Autoregressive
from diffuse.objectives.base import SpecialTokens
from diffuse.sampling.ar import ARSampler


class GrowingKVCache:
    """The previous KV cache, for the comparison: keys/values grown with torch.cat at every call."""

    def __init__(self):
        self.keys, self.values, self.segment_ids, self._layers = [], [], None, 0

    @property
    def length(self) -> int:
        return 0 if self.segment_ids is None else self.segment_ids.shape[1]

    def extend(self, seg):
        self.segment_ids = seg if self.segment_ids is None else torch.cat([self.segment_ids, seg], dim=1)
        return self.segment_ids

    def update(self, layer, k, v):
        if layer < len(self.keys):
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys.append(k)
            self.values.append(v)
        return k, v


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    V = args.vocab
    special = SpecialTokens(pad=V - 4, bos=V - 3, eos=V - 2, mask=V - 1)
    objective = Autoregressive(special=special)
    torch.manual_seed(0)
    model = Transformer(V, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads).to(device).eval()
    head = model.logits

    def no_eos(hidden):  # every row runs the full length
        out = head(hidden)
        out[..., special.eos] = float("-inf")
        return out

    model.logits = no_eos
    static_new_cache = model.new_cache
    caches = {"growing (torch.cat)": lambda max_length: GrowingKVCache(), "static (in place)": static_new_cache}
    sampler = ARSampler(temperature=1.0)
    print(f"device={device} threads={torch.get_num_threads()} d_model={args.d_model} n_layers={args.n_layers} "
          f"vocab={V} prompt={args.prompt} length={args.length} torch={torch.__version__}")
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, V - 4, (batch, args.prompt), generator=g).tolist()
        best, tokens = dict.fromkeys(caches, float("inf")), {}
        for name, make in caches.items():  # warm-up
            model.new_cache = make
            sampler.generate(model, objective, prompts, min(args.length, 16), seed=0)
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            for name, make in caches.items():
                model.new_cache = make
                synchronize(device)
                t0 = time.perf_counter()
                tokens[name] = sampler.generate(model, objective, prompts, args.length, seed=0).tokens
                synchronize(device)
                best[name] = min(best[name], time.perf_counter() - t0)
        results = {name: (tokens[name], batch * args.length / best[name]) for name in caches}
        (old_tokens, old), (new_tokens, new) = results.values()
        same = torch.equal(old_tokens, new_tokens)
        for name, (_, tps) in results.items():
            print(f"batch {batch:3d}  {name:20s} {tps:10.1f} tokens/s")
        print(f"batch {batch:3d}  static / growing = {new / old:.2f}x   tokens identical: {same}")


if __name__ == "__main__":
    main()
