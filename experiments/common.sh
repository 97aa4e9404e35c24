# Sourced by every experiments/<study>/run.sh: run from the repository root, in its venv, offline, on
# Tiny Shakespeare from ../shared (DATA=… to use other text); runs go to experiments/runs/<study> (OUT=…),
# the committed results to experiments/<study>.
STUDY=$(basename "$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f .venv/bin/activate ] && source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
DATA=${DATA:-$(realpath ../shared/data/tinyshakespeare/input.txt)}
OUT=${OUT:-experiments/runs/$STUDY}
HERE=experiments/$STUDY

# train NAME OVERRIDES…: one run into $OUT/NAME with the study's COMMON overrides and THREADS threads;
# a run that already wrote metrics.json is kept (a rerun only re-measures)
train() {
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] && { echo "skip $name (done)"; return; }
  OMP_NUM_THREADS=$THREADS python -m diffuse.train "${COMMON[@]}" "$@" "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "trained $name"
}
