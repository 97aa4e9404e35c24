#!/usr/bin/env bash
# Block diffusion against full-sequence masked diffusion and AR, on the same data, model and token budget:
# block sizes 4 and 16 (objective.block_size), the full-sequence model (block = the row) and the AR
# baseline; held-out NELBO against block size (BD3LM: smaller blocks move the likelihood toward AR's), then
# the sampling benchmark (experiments/bench/sampling.py) on these checkpoints: tokens/s at equal gen-PPL
# against AR with its KV cache, under a judge AR trained here with another seed.
#   bash experiments/block_diffusion/run.sh            # CPU (~1 h on 2 cores; trained runs are kept)
#   SIZE=gpu bash experiments/block_diffusion/run.sh   # the bigger config for one GPU
set -euo pipefail
source "$(dirname "$0")/../common.sh"

if [ "${SIZE:-cpu}" = gpu ]; then
  SHAPE=(data.seq_len=256 data.batch_size=64 trainer=gpu trainer.max_steps=20000 trainer.val_check_interval=1000
         model=transformer_small)
  PARALLEL=0; BENCH=(--samples 64 --length 128)
else
  SHAPE=(data.seq_len=128 data.batch_size=16 trainer.max_steps=${STEPS:-600} trainer.val_check_interval=300
         trainer.limit_val_batches=16 trainer.log_every_n_steps=25 model.d_model=128 model.n_layers=4)
  PARALLEL=1; BENCH=(--samples 16 --length 64)
fi
COMMON=(data=text "data.path=$DATA" tokenizer=byte optim.lr=1e-3 optim.warmup_steps=50 seed=0 num_samples=2
        callbacks.progress_bar=null "${SHAPE[@]}")
THREADS=$([ $PARALLEL = 1 ] && echo 1 || nproc)

mkdir -p "$OUT" "$HERE/results"
if [ $PARALLEL = 1 ]; then  # two lanes of one thread each, the two slow block runs first
  { train block4 objective=masked_discrete objective.block_size=4; train ar objective=autoregressive;
    train judge_ar objective=autoregressive seed=1; } &
  { train block16 objective=masked_discrete objective.block_size=16; train full objective=masked_discrete; } &
  wait
else
  for b in 4 16; do train "block$b" objective=masked_discrete "objective.block_size=$b"; done
  train full objective=masked_discrete; train ar objective=autoregressive; train judge_ar objective=autoregressive seed=1
fi

# held-out NELBO against block size (the same validation rows and noise streams for every run)
python - "$OUT" > "$HERE/results/likelihood.md" <<'PY'
import json, sys
root = sys.argv[1]
print("| model | block size | val NELBO (nats/byte) | val bits/byte | train tokens/s |\n|---|---|---|---|---|")
for run, b in (("block4", 4), ("block16", 16), ("full", "full (128)"), ("ar", "AR (exact NLL)"), ("judge_ar", "judge (AR, seed 1)")):
    m = json.load(open(f"{root}/{run}/metrics.json"))
    print(f"| {run} | {b} | {m['val/nelbo']:.4f} | {m['val/bpt']:.4f} | {m['train/tokens_per_sec']:.0f} |")
PY
cat "$HERE/results/likelihood.md"
python -m diffuse.report --curves "$OUT/block4" "$OUT/block16" "$OUT/full" "$OUT/ar" \
  --labels "block 4,block 16,full sequence,AR" --metric val/bpt --out "$HERE/results/curves"

# sampling: speed beside quality, one run, same prompts, judge and sizes
python experiments/bench/sampling.py --runs "$OUT" --judge "$OUT/judge_ar/checkpoints/last.ckpt" "${BENCH[@]}" \
  --out experiments/bench --name sampling
