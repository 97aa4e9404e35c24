#!/usr/bin/env bash
# Does CDLM consistency training let a diffusion LM sample in fewer steps at the same quality?
# masked_discrete (transformer) and continuous (mamba2), each trained with and without
# regularizer=cdlm_consistency for the same steps on Tiny Shakespeare; then diffuse.compare sweeps the
# sampling steps of both under one judge (an AR model trained here on the same data) and reports the
# speedup factor, and threshold (parallel) decoding of the masked pair. CPU: ~37 min on 2 cores (pairs of
# runs side by side, one thread each; trained runs are kept, so a rerun only re-evaluates).
#   bash experiments/cdlm_speedup/run.sh            # the CPU study committed here
#   SIZE=gpu bash experiments/cdlm_speedup/run.sh   # the bigger config for one GPU
set -euo pipefail
source "$(dirname "$0")/../common.sh"

if [ "${SIZE:-cpu}" = gpu ]; then
  SHAPE=(data.seq_len=256 data.batch_size=64 trainer=gpu trainer.max_steps=20000 trainer.val_check_interval=1000)
  TRANSFORMER=(model=transformer_small); MAMBA=(model=mamba2_small); PARALLEL=0
  EVAL=(num_samples=64 length=128 batch_size=64)
else
  SHAPE=(data.seq_len=128 data.batch_size=16 trainer.max_steps=1500 trainer.val_check_interval=500
         trainer.limit_val_batches=8 trainer.log_every_n_steps=25)
  TRANSFORMER=(model.d_model=128 model.n_layers=4)
  # the pure-PyTorch SSD scan is ~3.5x slower than the transformer on CPU, and CDLM doubles its cost:
  # mamba2 gets half the batch and 800 steps (both of its runs alike)
  MAMBA=(model=mamba2 model.d_model=128 model.n_layers=4 data.batch_size=8 trainer.max_steps=800
         trainer.val_check_interval=400)
  PARALLEL=1; EVAL=(num_samples=16 length=64 batch_size=16)
fi
COMMON=(data=text "data.path=$DATA" tokenizer=byte optim.lr=1e-3 optim.warmup_steps=100 seed=0 num_samples=3
        callbacks.progress_bar=null "${SHAPE[@]}")
CDLM=(regularizer=cdlm_consistency regularizer.weight=0.5 regularizer.delta_min=50 regularizer.delta_max=200)
THREADS=$([ $PARALLEL = 1 ] && echo 1 || nproc)

mkdir -p "$OUT" "$HERE/results"

MASKED=(objective=masked_discrete sampler=remask "${TRANSFORMER[@]}")
CONT=(objective=continuous sampler=ddim "${MAMBA[@]}")
if [ $PARALLEL = 1 ]; then
  train masked "${MASKED[@]}" & train masked_cdlm "${MASKED[@]}" "${CDLM[@]}" & wait
  train continuous_cdlm "${CONT[@]}" "${CDLM[@]}" &
  { train continuous "${CONT[@]}"; train judge_ar objective=autoregressive sampler=ar "${TRANSFORMER[@]}"; } & wait
else
  train masked "${MASKED[@]}"; train masked_cdlm "${MASKED[@]}" "${CDLM[@]}"
  train continuous "${CONT[@]}"; train continuous_cdlm "${CONT[@]}" "${CDLM[@]}"
  train judge_ar objective=autoregressive sampler=ar "${TRANSFORMER[@]}"
fi

compare() {  # $1 = name, $2 = A run, $3 = B run, $4 = steps
  OMP_NUM_THREADS=$THREADS python -m diffuse.compare "a=$OUT/$2/checkpoints/last.ckpt" "b=$OUT/$3/checkpoints/last.ckpt" \
    "judge=$OUT/judge_ar/checkpoints/last.ckpt" "steps=$4" "${EVAL[@]}" progress=false \
    "hydra.run.dir=$OUT/compare_$1" > "$OUT/compare_$1.log" 2>&1
  cp "$OUT/compare_$1/comparison.md" "$HERE/results/$1.md"
  cp "$OUT/compare_$1/comparison.json" "$HERE/results/$1.json"
  cp "$OUT/compare_$1/comparison.png" "$HERE/results/$1.png"
  echo "compared $1"
}
if [ $PARALLEL = 1 ]; then
  compare masked masked masked_cdlm "[4,8,16,32,64]" & compare continuous continuous continuous_cdlm "[4,8,16,32,64,128]" & wait
else
  compare masked masked masked_cdlm "[4,8,16,32,64]"; compare continuous continuous continuous_cdlm "[4,8,16,32,64,128]"
fi
# two plots: the continuous bound (hundreds of bits/token this early) would flatten the masked/AR curves
python -m diffuse.report --curves "$OUT/masked" "$OUT/masked_cdlm" "$OUT/judge_ar" \
  --labels "masked,masked + CDLM,AR (judge)" --metric val/bpt --out "$HERE/results/curves_masked"
python -m diffuse.report --curves "$OUT/continuous" "$OUT/continuous_cdlm" \
  --labels "continuous,continuous + CDLM" --metric val/bpt --out "$HERE/results/curves_continuous"

# Parallel decoding, where consistent predictions should pay most: sampler=threshold commits every
# masked token whose confidence ≥ τ (at least one per step, at most 64 steps), so the model's own
# confidence sets the NFE. Same samples, seeds and judge as above; results/threshold.md.
threshold() {  # $1 = run, $2 = τ
  OMP_NUM_THREADS=$THREADS python -m diffuse.evaluate "ckpt=$OUT/$1/checkpoints/last.ckpt" \
    "judge=$OUT/judge_ar/checkpoints/last.ckpt" sampler=threshold "sampler.threshold=$2" sampler.steps=64 \
    likelihood=false "${EVAL[@]}" progress=false "hydra.run.dir=$OUT/threshold/$1_$2" > "$OUT/threshold_$1_$2.log" 2>&1
}
TAUS=(0.2 0.4 0.6 0.8 0.95)
for tau in "${TAUS[@]}"; do
  if [ $PARALLEL = 1 ]; then threshold masked "$tau" & threshold masked_cdlm "$tau" & wait
  else threshold masked "$tau"; threshold masked_cdlm "$tau"; fi
done
python - "$OUT/threshold" "${TAUS[@]}" > "$HERE/results/threshold.md" <<'PY'
import json, sys
root, taus = sys.argv[1], sys.argv[2:]
print("| τ | model | NFE (batch of 16) | NFE alone (mean) | gen-PPL | entropy (bits) | distinct-2 | s / sample |\n"
      "|---|---|---|---|---|---|---|---|")
for tau in taus:
    for run, label in (("masked", "baseline"), ("masked_cdlm", "+ CDLM")):
        r = json.load(open(f"{root}/{run}_{tau}/eval.json"))
        q = r["quality"]
        print(f"| {tau} | {label} | {q['nfe']} | {q['nfe_per_sample']:.1f} | {q['gen_ppl']:.2f} | {q['entropy']:.3f} | {q['distinct_2']:.3f} | "
              f"{q['seconds_per_sample']:.4f} |")
ref = r["reference"]
print(f"| | real text | | | {ref['judge_ppl']:.2f} | {ref['entropy']:.3f} | {ref['distinct_2']:.3f} | |")
PY
cat "$HERE/results/threshold.md"
