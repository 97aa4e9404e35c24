#!/usr/bin/env bash
# Few-step generation: one teacher, one AR judge, and every few-step family on one table —
# SDTT rounds 64 → 32 → 16 → 8 → 4, the CDLM student (trajectory distillation, block-causal, threshold
# decoding with the exact cache), the teacher-free regularizer=cdlm_consistency, the plain teacher,
# and AR with its KV cache. Same data, teacher, judge, samples and seeds for all.
#   bash experiments/few_step/run.sh            # CPU (≤ 90 min on 2 cores; finished runs are kept)
#   SIZE=gpu bash experiments/few_step/run.sh   # the bigger config for one GPU
set -euo pipefail
source "$(dirname "$0")/../common.sh"

if [ "${SIZE:-cpu}" = gpu ]; then
  SHAPE=(data.seq_len=256 data.batch_size=64 trainer=gpu trainer.val_check_interval=1000 model=transformer_small)
  PRETRAIN=20000; DISTILL=2000; PARALLEL=0; EVAL=(num_samples=256 length=128 batch_size=128)
else
  SHAPE=(data.seq_len=128 data.batch_size=16 trainer.val_check_interval=1000 trainer.limit_val_batches=16
         trainer.log_every_n_steps=50 model.d_model=128 model.n_layers=4)
  PRETRAIN=${STEPS:-3000}; DISTILL=${DISTILL_STEPS:-600}; PARALLEL=1; EVAL=(num_samples=64 length=64 batch_size=64)
fi
COMMON=(data=text "data.path=$DATA" tokenizer=byte optim.lr=1e-3 optim.warmup_steps=100 seed=0 num_samples=2
        callbacks.progress_bar=null "${SHAPE[@]}")
THREADS=$([ $PARALLEL = 1 ] && echo 1 || nproc)
mkdir -p "$OUT" "$HERE/results"

# 1. the teacher (masked diffusion, MDLM's linear schedule), the AR baseline and the AR judge (another seed)
if [ $PARALLEL = 1 ]; then
  train teacher objective=masked_discrete sampler=ancestral trainer.max_steps=$PRETRAIN &
  { train judge_ar objective=autoregressive seed=1 trainer.max_steps=$PRETRAIN
    train ar objective=autoregressive trainer.max_steps=$PRETRAIN; } &
  wait
else
  train teacher objective=masked_discrete sampler=ancestral trainer.max_steps=$PRETRAIN
  train judge_ar objective=autoregressive seed=1 trainer.max_steps=$PRETRAIN
  train ar objective=autoregressive trainer.max_steps=$PRETRAIN
fi
[ "${STAGE:-all}" = train ] && exit 0
TEACHER=$OUT/teacher/checkpoints/last.ckpt

# 2. the few-step families, each from the teacher with its own extra training (stated in the table):
#    SDTT 4 rounds × DISTILL steps; CDLM DISTILL steps; regularizer=cdlm_consistency DISTILL steps of fine-tuning;
#    the plain teacher fine-tuned DISTILL steps more (the control)
STUDENT=(max_steps=$DISTILL lr=3e-4 warmup_steps=20
         "overrides=[\"callbacks.progress_bar=null\",\"trainer.val_check_interval=$DISTILL\",\"trainer.limit_val_batches=16\",\"trainer.log_every_n_steps=50\",\"num_samples=2\"]")
distill() {  # NAME ARGS…: python -m diffuse.distill into $OUT/NAME (kept once distill.json exists)
  local name=$1; shift
  [ -f "$OUT/$name/distill.json" ] && { echo "skip $name (done)"; return; }
  OMP_NUM_THREADS=$THREADS python -m diffuse.distill "teacher=$TEACHER" "${STUDENT[@]}" "$@" \
    "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "distilled $name"
}
CDLM_ARGS=(method=cdlm method.block_size=8 method.num_trajectories=1024 method.gen_length=64 method.threshold=0.9)
REG=(objective=masked_discrete sampler=ancestral "init_from=$TEACHER" trainer.max_steps=$DISTILL optim.lr=3e-4
     optim.warmup_steps=20 trainer.val_check_interval=$DISTILL regularizer=cdlm_consistency regularizer.weight=0.5
     regularizer.delta_min=50 regularizer.delta_max=200)
# the control: the same fine-tuning without any few-step method (is a gain the method's, or more training's?)
MORE=(objective=masked_discrete sampler=ancestral "init_from=$TEACHER" trainer.max_steps=$DISTILL optim.lr=3e-4
      optim.warmup_steps=20 trainer.val_check_interval=$DISTILL)
if [ $PARALLEL = 1 ]; then
  { distill sdtt method=sdtt rounds=4 steps=64; train teacher_more "${MORE[@]}"; } &
  { distill cdlm "${CDLM_ARGS[@]}"; train seed_regularizer "${REG[@]}"; } &
  wait
else
  distill sdtt method=sdtt rounds=4 steps=64; distill cdlm "${CDLM_ARGS[@]}"; train seed_regularizer "${REG[@]}"
  train teacher_more "${MORE[@]}"
fi

# 3. quality and speed, one model at a time with every thread (timings comparable): 64 unconditional
#    samples of 64 bytes per point, the same seeds, judge and real-text reference line for all
evaluate() {  # NAME CKPT ARGS…
  local name=$1 ckpt=$2; shift 2
  [ -f "$OUT/eval/$name/eval.json" ] && { echo "skip eval $name (done)"; return; }
  python -m diffuse.evaluate "ckpt=$ckpt" "judge=$OUT/judge_ar/checkpoints/last.ckpt" "${EVAL[@]}" t_samples=2 \
    limit_batches=8 progress=false "$@" "hydra.run.dir=$OUT/eval/$name" > "$OUT/eval_$name.log" 2>&1
  echo "evaluated $name"
}
SWEEP="steps=[4,8,16,32,64]"
evaluate teacher "$TEACHER" "$SWEEP"
for r in 1 2 3 4; do evaluate "sdtt_round$r" "$OUT/sdtt/round$r/checkpoints/last.ckpt" "$SWEEP"; done
evaluate seed_regularizer "$OUT/seed_regularizer/checkpoints/last.ckpt" "$SWEEP"
evaluate teacher_more "$OUT/teacher_more/checkpoints/last.ckpt" "$SWEEP"
evaluate ar "$OUT/ar/checkpoints/last.ckpt"
# CDLM: blocks of 8 with the exact cache; per-block steps 1 … 8 (even split), and threshold (parallel) commits
evaluate cdlm "$OUT/cdlm/round1/checkpoints/last.ckpt" "steps=[1,2,4,8]" sampler=block
for tau in 0.5 0.7 0.9; do
  evaluate "cdlm_threshold$tau" "$OUT/cdlm/round1/checkpoints/last.ckpt" sampler=block sampler.steps=8 \
    "sampler.threshold=$tau" likelihood=false
done

python experiments/few_step/table.py "$OUT" "$HERE/results"
