#!/usr/bin/env bash
# GPU check: one script, ≤ 8 minutes on an H100 or H200 (--budget-s 450 for the sections, plus the installs).
# The sections (tests, masks, block, kvcache, sampling, p4, p6, train) and the report are
# experiments/bench/gpu_check.py's (its docstring); this wrapper finds the wheels and the data, installs what
# the machine lacks, and runs it.
#
#   bash experiments/bench/gpu_check.sh --prepare              # beforehand, on a machine with ../shared and PyPI:
#                                                              # fills .gpu/ (git-ignored): the mamba-ssm and
#                                                              # causal-conv1d wheels, pure-Python wheels of what the
#                                                              # GPU image lacks, Tiny Shakespeare, the commit
#   bash experiments/bench/gpu_check.sh [gpu_check.py args]    # on the GPU machine (device tool: carry [".gpu"])
#   bash experiments/bench/gpu_check.sh --device cpu --tiny    # anywhere, in a few minutes; installs nothing
#
# Wheels come from $WHEELS, else .gpu/wheels, shared/wheels or ../shared/wheels; each is installed (pip
# --no-index --no-deps --target, into /tmp/gpu-check-site) only when its module is not importable already.
# The report lands in experiments/bench/gpu-<date>.md (gpu-<date>-cpu-tiny.md for --device cpu --tiny) and,
# with the full log, in $OUT when that is set (the device tool's folder that comes back).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

# diffuse's own dependencies that the GPU image does not ship (KINDS.md's package list), pinned to this venv's
PURE=(hydra-core omegaconf antlr4-python3-runtime datasets dill multiprocess)

first_dir() { for d in "$@"; do [ -n "$d" ] && [ -d "$d" ] && ls "$d"/*.whl >/dev/null 2>&1 && { echo "$d"; return; }; done; }

prepare() {
    mkdir -p .gpu/wheels .gpu/data .git/info
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    local src; src=$(first_dir "${WHEELS:-}" shared/wheels ../shared/wheels)
    [ -n "$src" ] || { echo "no mamba-ssm / causal-conv1d wheels found (set WHEELS=DIR)" >&2; exit 2; }
    cp "$src"/mamba_ssm-*.whl "$src"/causal_conv1d-*.whl .gpu/wheels/
    cp "${DATA:-../shared/data/tinyshakespeare/input.txt}" .gpu/data/tinyshakespeare.txt
    local pins=() p
    for p in "${PURE[@]}"; do pins+=("$p==$("$PY" -c "import importlib.metadata as m; print(m.version('$p'))")"); done
    # antlr4-python3-runtime 4.9.3 ships no wheel: build its pure-Python one here; the rest as cp312 binaries
    "$PY" -m pip wheel -q --no-deps -w .gpu/wheels "${pins[2]}"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels "${pins[0]}" "${pins[1]}" "${pins[@]:3}"
    { git rev-parse --short HEAD; git status --porcelain --untracked-files=no | grep -q . && echo "(uncommitted changes)"; } \
        2>/dev/null | paste -sd' ' > .gpu/COMMIT || true
    local tree
    tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) || echo 0)
    echo "prepared .gpu/: $(du -sb .gpu | cut -f1) bytes + the tree's $tree bytes (the device tool carries 64 MiB = 67108864)"
    ls -la .gpu/wheels
}

install_missing() {
    local dir; dir=$(first_dir "${WHEELS:-}" .gpu/wheels shared/wheels ../shared/wheels)
    [ -n "$dir" ] || { echo "gpu_check: no wheel folder found; using what is installed"; return; }
    local site=/tmp/gpu-check-site missing=() whl name module
    for whl in "$dir"/*.whl; do
        name=$(basename "$whl" | cut -d- -f1)
        case "$name" in hydra_core) module=hydra ;; antlr4_python3_runtime) module=antlr4 ;; *) module=$name ;; esac
        "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null \
            || missing+=("$whl")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "gpu_check: installing ${missing[*]##*/}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${missing[@]}"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
}

if [ "${1:-}" = "--prepare" ]; then prepare; exit 0; fi

on_cpu=0
for arg in "$@"; do [ "$arg" = "cpu" ] || [ "$arg" = "--device=cpu" ] && on_cpu=1; done
[ "$on_cpu" = 1 ] || install_missing
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # diffuse from this tree, installed or not
[ -z "${DATA:-}" ] && [ -f .gpu/data/tinyshakespeare.txt ] && export DATA=.gpu/data/tinyshakespeare.txt

log=${OUT:-/tmp}/gpu_check.log
set +e
"$PY" experiments/bench/gpu_check.py "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
report=$(sed -n 's/^report: //p' "$log" | tail -1)
[ -n "${OUT:-}" ] && [ -n "$report" ] && cp "$report" "$OUT/"
exit "$rc"
