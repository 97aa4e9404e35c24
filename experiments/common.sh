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
