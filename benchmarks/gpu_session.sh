#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md ("GPU-grade scoring") in one call on a lent machine
# that has PyTorch, transformers and peft but not tive: run from the repository root, with the
# wheels tive needs beyond those in .whl/ (orjson; see benchmarks/README.md for the download).
# Writes $OUT/log; SHAPES (default llava-7b), LIMIT (seconds, default 500) and EXTRA (more
# options, e.g. EXTRA=--tiny to try it on a CPU) change the run.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG=$OUT/log
step() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

step start
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
if ! python3 -c "import orjson" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { step "pip failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, transformers, peft, tive; print('torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'tive', tive.__version__)" \
    >>"$LOG" 2>&1 || { step "imports failed"; exit 1; }
step "gpu_throughput --shapes ${SHAPES:-llava-7b}"
timeout "${LIMIT:-500}" python3 benchmarks/gpu_throughput.py --shapes "${SHAPES:-llava-7b}" \
    ${EXTRA:-} 2>&1 | grep -v -i -e warn -e "shards" | tee -a "$LOG"
step "end rc=${PIPESTATUS[0]}"
