#!/usr/bin/env bash
# lm-evaluation-harness (python -m diffuse.lm_eval) on the checkpoints of experiments/hybrid (Tiny Shakespeare,
# byte tokenizer, 128-byte rows, 0.89M parameters): AR, the hybrid (λ = 0.1) and the block-8 masked model, on the
# three offline tasks built from the file's last 12,000 characters (evaluation/local_tasks.py), one lm_eval run per
# task so each has its own wall time; then the spread of the Monte-Carlo estimate against mc_samples (spread.py).
#   bash experiments/hybrid/run.sh && bash experiments/lm_eval/run.sh     # CPU, one thread: ~25 min on 2 busy cores
set -euo pipefail
source "$(dirname "$0")/../common.sh"
export OMP_NUM_THREADS=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUNS=${RUNS:-experiments/runs/hybrid}
mkdir -p "$OUT" "$HERE/results"
tail -c 12000 "$DATA" > "$OUT/heldout_tail.txt"
python -c "from diffuse.evaluation.local_tasks import write_local_tasks as w; w('$OUT/heldout_tail.txt', '$OUT/tasks', docs=40)"

declare -A LIMIT=([diffuse_cloze]=20 [diffuse_text]=10 [diffuse_continue]=5)
for model in ar hybrid_w01 block8; do
  for task in diffuse_cloze diffuse_text diffuse_continue; do
    start=$(date +%s.%N)
    python -m diffuse.lm_eval "ckpt=$RUNS/$model/checkpoints/last.ckpt" "tasks=[$task]" "task_dir=$OUT/tasks" \
      builtin_tasks=false "limit=${LIMIT[$task]}" batch_size=64 device=cpu "hydra.run.dir=$OUT/$model/$task" \
      > "$OUT/$model.$task.log" 2>&1
    echo "$(date +%s.%N) - $start" | bc > "$OUT/$model/$task/wall_s"
    echo "$model $task done"
  done
done

python - "$OUT" > "$HERE/results/tasks.md" <<'PY'
import json, sys
root = sys.argv[1]
metric = {"diffuse_cloze": "acc,none", "diffuse_text": "bits_per_byte,none", "diffuse_continue": "exact_match,none"}
print("| checkpoint | loglikelihood estimator | cloze acc (20 docs) | text bits/byte (10 docs) | continue exact match (5) | seconds evaluating (whole command): cloze / text / continue |")
print("|---|---|---|---|---|---|")
for model in ("ar", "hybrid_w01", "block8"):
    cells, walls, est = [], [], ""
    for task in ("diffuse_cloze", "diffuse_text", "diffuse_continue"):
        out = json.load(open(f"{root}/{model}/{task}/results.json"))
        cells.append(f"{out['results'][task][metric[task]]:.3f}")
        walls.append(f"{out['diffuse']['evaluation_seconds']:.0f} ({float(open(f'{root}/{model}/{task}/wall_s').read()):.0f})")
        est = out["diffuse"].get("loglikelihood", {}).get("estimator", est).split(" (")[0] or est
    print(f"| {model} | {est} | {' | '.join(cells)} | {' / '.join(walls)} |")
PY
python experiments/lm_eval/spread.py "$RUNS/block8/checkpoints/last.ckpt" "$OUT/tasks" --docs 5 --seeds 4 \
  --n 32 128 512 > "$HERE/results/spread.md"
cat "$HERE/results/tasks.md" "$HERE/results/spread.md"
