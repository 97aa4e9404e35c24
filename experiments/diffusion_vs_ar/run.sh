#!/usr/bin/env bash
# Diffusion vs autoregression when data is scarce and repeated: the same transformer trained as masked
# diffusion and as an AR model on a fixed 64k-byte slice of Tiny Shakespeare for ~94 epochs; held-out
# bits/token against epochs. CPU: ~20 min on 2 cores (the two runs side by side, one thread each).
#   bash experiments/diffusion_vs_ar/run.sh            # the CPU study committed here
#   SIZE=gpu bash experiments/diffusion_vs_ar/run.sh   # the bigger config for one GPU
set -euo pipefail
source "$(dirname "$0")/../common.sh"

if [ "${SIZE:-cpu}" = gpu ]; then
  # the ≈7M-parameter TDLM backbone, BPE 8192, a 512k-token slice repeated ~100 times
  ARGS=(model=transformer_small tokenizer=bpe tokenizer.vocab_size=8192 data.seq_len=256 data.batch_size=64
        data.train_tokens=524288 trainer=gpu trainer.max_steps=3200 trainer.val_check_interval=64
        trainer.limit_val_batches=null)
  PARALLEL=0
else
  # 0.8M parameters, bytes; 65,536 training tokens = 512 rows of 128 = 32 steps/epoch at batch 16
  ARGS=(model.d_model=128 model.n_layers=4 tokenizer=byte data.seq_len=128 data.batch_size=16
        data.train_tokens=65536 trainer.max_steps=3000 trainer.val_check_interval=96 trainer.limit_val_batches=8
        trainer.log_every_n_steps=32)
  PARALLEL=1
fi
COMMON=(data=text "data.path=$DATA" data.eval_batch_size=32 optim.lr=1e-3 optim.warmup_steps=100 seed=0
        num_samples=3 callbacks.progress_bar=null "${ARGS[@]}")

train() {  # $1 = objective, $2 = run name
  OMP_NUM_THREADS=$([ $PARALLEL = 1 ] && echo 1 || nproc) \
    python -m diffuse.train objective=$1 "${COMMON[@]}" "hydra.run.dir=$OUT/$2" > "$OUT/$2.log" 2>&1
}
mkdir -p "$OUT"
if [ $PARALLEL = 1 ]; then
  train masked_discrete masked & train autoregressive ar & wait
else
  train masked_discrete masked; train autoregressive ar
fi

python -m diffuse.report --curves "$OUT/masked" "$OUT/ar" --labels "masked diffusion,autoregressive" \
  --metric val/bpt --x epochs --out "$HERE/results"
python - "$HERE/results/curves_val_bpt.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for run in dict.fromkeys(r["run"] for r in rows):
    pts = [(float(r["epochs"]), float(r["val/bpt"])) for r in rows if r["run"] == run]
    best = min(pts, key=lambda p: p[1])
    print(f"{run:>18}: best val/bpt {best[1]:.3f} at epoch {best[0]:.0f}; last {pts[-1][1]:.3f} at epoch {pts[-1][0]:.0f}")
PY
