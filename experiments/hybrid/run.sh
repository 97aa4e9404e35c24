#!/usr/bin/env bash
# The hybrid (objective=hybrid, TiDAR: one network trained as AR on a causal clean row and as a block diffusion
# drafter on [MASK] draft blocks) against a pure AR model of the same size, data and budget: does the diffusion
# loss cost the AR anything (held-out NLL, val/nelbo — the hybrid's is its AR NLL) at diffusion_weight 1.0 and
# 0.1, from scratch and started from an AR checkpoint (init_from, against the same AR continued as AR)? Then the
# sampling benchmark (experiments/bench/sampling.py --suite hybrid): AR + KV cache, the hybrid decoded as AR,
# the hybrid + speculative sampling at draft lengths 2/4/8, AR + a block diffusion drafter.
#   bash experiments/hybrid/run.sh            # CPU (~18 min of training on one thread + ~1 min of benchmark)
#   SIZE=gpu bash experiments/hybrid/run.sh   # the bigger config for one GPU
set -euo pipefail
source "$(dirname "$0")/../common.sh"

if [ "${SIZE:-cpu}" = gpu ]; then
  SHAPE=(data.seq_len=256 data.batch_size=64 trainer=gpu trainer.max_steps=20000 trainer.val_check_interval=1000
         model=transformer_small)
  THREADS=$(nproc); BENCH=(--samples 64 --length 128)
else
  SHAPE=(data.seq_len=128 data.batch_size=8 trainer.max_steps=${STEPS:-600} trainer.val_check_interval=300
         trainer.limit_val_batches=16 trainer.log_every_n_steps=25 model.d_model=128 model.n_layers=4)
  THREADS=${THREADS:-1}; BENCH=(--samples 16 --length 64)
fi
COMMON=(data=text "data.path=$DATA" tokenizer=byte optim.lr=1e-3 optim.warmup_steps=30 seed=0 num_samples=0
        callbacks.progress_bar=null "${SHAPE[@]}")
HYB=(objective=hybrid objective.block_size=8 objective.draft_noise=full)

mkdir -p "$OUT" "$HERE/results"
train ar objective=autoregressive
train judge_ar objective=autoregressive seed=1
train hybrid_w1 "${HYB[@]}" objective.diffusion_weight=1.0
train block8 objective=masked_discrete objective.block_size=8      # the diffusion drafter for AR
train hybrid_w01 "${HYB[@]}" objective.diffusion_weight=0.1
# from an AR checkpoint: the same budget again as a hybrid, against the same AR continued as AR
train ar_cont objective=autoregressive "init_from=$OUT/ar/checkpoints/last.ckpt"
train hybrid_from_ar_w1 "${HYB[@]}" objective.diffusion_weight=1.0 "init_from=$OUT/ar/checkpoints/last.ckpt"
[ -n "${MORE:-}" ] && train hybrid_from_ar_w01 "${HYB[@]}" objective.diffusion_weight=0.1 "init_from=$OUT/ar/checkpoints/last.ckpt"

# held-out AR NLL (val/nelbo: the hybrid's is its clean row's NLL; same validation rows for every run)
python - "$OUT" > "$HERE/results/likelihood.md" <<'PY'
import json, os, sys
root = sys.argv[1]
runs = [("ar", "AR", "scratch", "—"), ("hybrid_w1", "hybrid", "scratch", "1.0"), ("hybrid_w01", "hybrid", "scratch", "0.1"),
        ("ar_cont", "AR", "from ar", "—"), ("hybrid_from_ar_w1", "hybrid", "from ar", "1.0"),
        ("hybrid_from_ar_w01", "hybrid", "from ar", "0.1"), ("judge_ar", "AR (judge, seed 1)", "scratch", "—"),
        ("block8", "block diffusion b=8 (drafter; NELBO bound)", "scratch", "—")]
print("| run | model | start | diffusion_weight | val/nelbo (nats/byte) | vs AR | val bits/byte | train/diffusion_loss | train tokens/s |")
print("|---|---|---|---|---|---|---|---|---|")
base = {"scratch": "ar", "from ar": "ar_cont"}
for run, model, start, w in runs:
    path = f"{root}/{run}/metrics.json"
    if not os.path.exists(path):
        continue
    m = json.load(open(path))
    ref = json.load(open(f"{root}/{base[start]}/metrics.json"))["val/nelbo"]
    rel = "" if run.startswith(("judge", "block")) else f"{100 * (m['val/nelbo'] / ref - 1):+.2f}%"
    dl = m.get("train/diffusion_loss")
    print(f"| {run} | {model} | {start} | {w} | {m['val/nelbo']:.4f} | {rel} | {m['val/bpt']:.4f} | "
          f"{'' if dl is None else f'{dl:.3f}'} | {m['train/tokens_per_sec']:.0f} |")
PY
cat "$HERE/results/likelihood.md"
[ -n "${TRAIN_ONLY:-}" ] && exit 0

# sampling: speed beside quality, same judge and prompts as the bench's other rows
OMP_NUM_THREADS=1 python experiments/bench/sampling.py --suite hybrid --runs "$OUT" \
  --judge "$OUT/judge_ar/checkpoints/last.ckpt" "${BENCH[@]}" --batch1-samples 8 --repeats 2 --out "$HERE/results" --name sampling \
  --plot-draft "$HERE/results/tokens_per_s_vs_draft_length.png"
