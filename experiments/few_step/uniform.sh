#!/usr/bin/env bash
# Few-step generation, uniform-state stage (issue 26 item 5): masked vs uniform-state diffusion on one table.
# Same data (Tiny Shakespeare, byte tokenizer, rows of 128), backbone (d_model 128 × 4 layers, 0.89 M) and judge
# procedure (an AR transformer of the same size, seed 1) as run.sh, at a smaller CPU budget (README: Results, uniform):
#   teachers: masked_discrete | uniform loss=nelbo | uniform loss=ce | uniform nelbo + model.self_condition=true
#   commit rules: masked — ancestral, threshold, eb at a few γ; uniform — uniform_ancestral, entropy_bound
#   distillation: DCD rounds on the uniform (nelbo) teacher beside SDTT rounds on the masked one
#   bash experiments/few_step/uniform.sh          # ≈ 50 min on 2 shared CPU cores (measured 47); finished runs kept
#   LANE=a|b bash experiments/few_step/uniform.sh # one lane only (e.g. on two machines); then LANE=table
#   STEPS=… JUDGE_STEPS=… DISTILL_STEPS=… ROUNDS=… to scale
set -euo pipefail
source "$(dirname "$0")/../common.sh"
OUT=${OUT_UNIFORM:-experiments/runs/few_step_uniform}
RESULTS=$HERE/results_uniform
PRETRAIN=${STEPS:-800}; JUDGE=${JUDGE_STEPS:-1200}; DISTILL=${DISTILL_STEPS:-200}; ROUNDS=${ROUNDS:-3}
LONG=${LONG_STEPS:-1600}   # the uniform and masked teachers continued this many more steps (init_from), 0: skip
SHAPE=(data.seq_len=128 data.batch_size=16 trainer.val_check_interval=$PRETRAIN trainer.limit_val_batches=8
       trainer.log_every_n_steps=50 model.d_model=128 model.n_layers=4)
COMMON=(data=text "data.path=$DATA" tokenizer=byte optim.lr=1e-3 optim.warmup_steps=100 seed=0 num_samples=2
        callbacks.progress_bar=null "${SHAPE[@]}")
EVAL=(num_samples=32 length=64 batch_size=32 t_samples=2 limit_batches=8 progress=false)
SWEEP="steps=[4,8,16,32,64]"
THREADS=1   # two one-thread lanes side by side, niced (the machine is shared with other work)
RUN=(env OMP_NUM_THREADS=$THREADS nice -n 5)
mkdir -p "$OUT" "$RESULTS"

train() {  # NAME OVERRIDES…: as common.sh's, niced; kept once metrics.json exists
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && { echo "skip $name (done)"; return; }
  "${RUN[@]}" python -m diffuse.train "${COMMON[@]}" "$@" "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "trained $name"
}
distill() {  # NAME TEACHER ARGS…: ROUNDS rounds from 64 steps (students at 32, 16, 8), DISTILL steps each
  local name=$1 teacher=$2; shift 2
  [ -f "$OUT/$name/distill.json" ] && { echo "skip $name (done)"; return; }
  "${RUN[@]}" python -m diffuse.distill "teacher=$teacher" rounds=$ROUNDS steps=64 max_steps=$DISTILL lr=3e-4 \
    warmup_steps=20 "overrides=[\"callbacks.progress_bar=null\",\"trainer.val_check_interval=$DISTILL\",\"trainer.limit_val_batches=8\",\"trainer.log_every_n_steps=50\",\"num_samples=2\"]" \
    "$@" "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "distilled $name"
}
evaluate() {  # NAME CKPT ARGS…: 32 unconditional samples × 64 bytes per point under the judge
  local name=$1 ckpt=$2; shift 2
  [ -f "$OUT/eval/$name/eval.json" ] && { echo "skip eval $name (done)"; return; }
  "${RUN[@]}" python -m diffuse.evaluate "ckpt=$ckpt" "judge=$OUT/judge_ar/checkpoints/last.ckpt" "${EVAL[@]}" \
    "$@" "hydra.run.dir=$OUT/eval/$name" > "$OUT/eval_$name.log" 2>&1
  echo "evaluated $name"
}
ck() { echo "$OUT/$1/checkpoints/last.ckpt"; }
UNI=(objective=uniform sampler=uniform_ancestral trainer.max_steps=$PRETRAIN)

lane_a() {  # the judge; the uniform (nelbo) teacher, its DCD rounds and their evaluation
  train judge_ar objective=autoregressive seed=1 trainer.max_steps=$JUDGE
  train uniform "${UNI[@]}"
  distill dcd "$(ck uniform)" method=dcd
  evaluate uniform "$(ck uniform)" "$SWEEP"
  for g in 0.1 1.0 4.0; do  # DiffusionGemma's loop: steps is a cap, rows stop early once stable and confident
    evaluate "uniform_eb$g" "$(ck uniform)" sampler=entropy_bound sampler.steps=64 "sampler.gamma=$g" likelihood=false
  done
  for r in $(seq 1 "$ROUNDS"); do evaluate "dcd_round$r" "$OUT/dcd/round$r/checkpoints/last.ckpt" "$SWEEP"; done
  [ "$LONG" = 0 ] && return  # at 800 steps the uniform teacher's samples hardly depend on steps: a longer one
  train uniform_long "${UNI[@]}" "init_from=$(ck uniform)" trainer.max_steps=$LONG trainer.val_check_interval=$LONG
  distill dcd_long "$(ck uniform_long)" method=dcd
  evaluate uniform_long "$(ck uniform_long)" "$SWEEP"
  evaluate uniform_long_eb1.0 "$(ck uniform_long)" sampler=entropy_bound sampler.steps=64 sampler.gamma=1.0 likelihood=false
  for r in $(seq 1 "$ROUNDS"); do evaluate "dcd_long_round$r" "$OUT/dcd_long/round$r/checkpoints/last.ckpt" "$SWEEP"; done
}
lane_b() {  # the masked teacher, its commit rules and SDTT rounds; uniform with self-conditioning and loss=ce
  train masked objective=masked_discrete sampler=ancestral trainer.max_steps=$PRETRAIN
  distill sdtt "$(ck masked)" method=sdtt
  evaluate masked "$(ck masked)" "$SWEEP"
  for tau in 0.3 0.5 0.9; do
    evaluate "masked_threshold$tau" "$(ck masked)" sampler=threshold sampler.steps=64 "sampler.threshold=$tau" likelihood=false
  done
  for g in 0.01 0.1 1.0 4.0 16.0; do
    evaluate "masked_eb$g" "$(ck masked)" sampler=eb sampler.steps=64 "sampler.gamma=$g" likelihood=false
  done
  for r in $(seq 1 "$ROUNDS"); do evaluate "sdtt_round$r" "$OUT/sdtt/round$r/checkpoints/last.ckpt" "$SWEEP"; done
  train uniform_sc "${UNI[@]}" model.self_condition=true
  evaluate uniform_sc "$(ck uniform_sc)" "$SWEEP"
  evaluate uniform_sc_eb0.1 "$(ck uniform_sc)" sampler=entropy_bound sampler.steps=64 sampler.gamma=0.1 likelihood=false
  train uniform_ce "${UNI[@]}" objective.loss=ce
  evaluate uniform_ce "$(ck uniform_ce)" "$SWEEP"
  [ "$LONG" = 0 ] && return  # the masked teacher continued as long, for an equal-budget pair with uniform_long
  train masked_long objective=masked_discrete sampler=ancestral "init_from=$(ck masked)" trainer.max_steps=$LONG \
    trainer.val_check_interval=$LONG
  evaluate masked_long "$(ck masked_long)" "$SWEEP"
}
case "${LANE:-both}" in
  a) lane_a ;;
  b) lane_b ;;
  both) lane_a & lane_b & wait ;;
esac
[ "${LANE:-both}" = both ] || [ "${LANE:-}" = table ] || exit 0
python experiments/few_step/table_uniform.py "$OUT" "$RESULTS"
