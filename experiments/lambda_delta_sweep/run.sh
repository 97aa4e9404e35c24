#!/usr/bin/env bash
# How do the CDLM consistency weight λ and the gap δ trade likelihood against few-step sample quality?
# A 3 × 2 Hydra multirun over regularizer.weight × regularizer.delta_min (δ ~ U{delta_min..200} of T=1000)
# on the masked-diffusion transformer of cdlm_speedup, one λ=0 baseline beside it, each checkpoint
# evaluated at 8 and 64 sampling steps under cdlm_speedup's AR judge; diffuse.report's table and plots.
# CPU: ~26 min on 2 cores (two runs at a time through the joblib launcher, one thread each).
# Needs experiments/cdlm_speedup/run.sh to have trained its judge (experiments/runs/cdlm_speedup/judge_ar).
#   bash experiments/lambda_delta_sweep/run.sh            # the CPU study committed here
#   SIZE=gpu bash experiments/lambda_delta_sweep/run.sh   # the bigger config for one GPU (runs one at a time)
set -euo pipefail
source "$(dirname "$0")/../common.sh"
JUDGE=${JUDGE:-experiments/runs/cdlm_speedup/judge_ar/checkpoints/last.ckpt}
[ -f "$JUDGE" ] || { echo "no judge at $JUDGE: run experiments/cdlm_speedup/run.sh first (or JUDGE=…)" >&2; exit 1; }

if [ "${SIZE:-cpu}" = gpu ]; then
  SHAPE=(model=transformer_small data.seq_len=256 data.batch_size=64 trainer=gpu trainer.max_steps=10000
         trainer.val_check_interval=1000)
  LAUNCH=(); EVAL=(num_samples=64 length=128 batch_size=64); export OMP_NUM_THREADS=$(nproc)
else
  SHAPE=(model.d_model=128 model.n_layers=4 data.seq_len=128 data.batch_size=16 trainer.max_steps=600
         trainer.val_check_interval=300 trainer.limit_val_batches=8 trainer.log_every_n_steps=25)
  LAUNCH=(hydra/launcher=joblib hydra.launcher.n_jobs=2); EVAL=(num_samples=16 length=64 batch_size=16)
  export OMP_NUM_THREADS=1
fi
COMMON=(objective=masked_discrete sampler=remask data=text "data.path=$DATA" tokenizer=byte optim.lr=1e-3
        optim.warmup_steps=100 seed=0 num_samples=0 callbacks.progress_bar=null "${SHAPE[@]}")

if ! ls "$OUT"/sweep/*/metrics.json > /dev/null 2>&1; then
  python -m diffuse.train -m "${COMMON[@]}" regularizer=cdlm_consistency regularizer.delta_max=200 \
    regularizer.weight=0.1,0.5,1.0 regularizer.delta_min=20,100 "${LAUNCH[@]}" \
    "hydra.sweep.dir=$OUT/sweep" > "$OUT.log" 2>&1 &
  # the λ = 0 baseline: the same command without the regularizer (a one-run multirun so it shares the layout)
  python -m diffuse.train -m "${COMMON[@]}" regularizer=none "hydra.sweep.dir=$OUT/baseline" > "$OUT.baseline.log" 2>&1
  wait
fi

evaluate() {  # $1 = run dir: gen-PPL at 8 and 64 steps → <run>/eval/eval.json (read by diffuse.report)
  python -m diffuse.evaluate "ckpt=$1/checkpoints/last.ckpt" "judge=$JUDGE" "steps=[8,64]" "${EVAL[@]}" \
    progress=false "hydra.run.dir=$1/eval" > "$1/eval.log" 2>&1
}
runs=("$OUT"/sweep/[0-9]* "$OUT"/baseline/0)
for ((i = 0; i < ${#runs[@]}; i += 2)); do
  evaluate "${runs[i]}" & { [ -n "${runs[i+1]:-}" ] && evaluate "${runs[i+1]}"; }; wait
done

# one table with the baseline beside the sweep; plots against λ and δ from the sweep alone
mkdir -p "$HERE/results"
python -m diffuse.report "$OUT" --metric eval/gen_ppl@8 --no-plot --out "$HERE/results/table"
for metric in val/bpt eval/gen_ppl@8 eval/gen_ppl@64; do
  python -m diffuse.report "$OUT/sweep" --metric "$metric" --out "$HERE/results/sweep"
done
