#!/usr/bin/env bash
# GPU check of the fused Triton loss kernels; <= 6 minutes on one H100/H200. Writes bench/results/gpu/:
#   pytest.txt              the GPU-relevant test modules (CUDA tests included) and their summary
#   gpu_check_gpu.{jsonl,md} correctness vs the torch path (K = 32000, 58101, 128256; fp32/bf16/fp16;
#                           grad_output 1 and 65536), one N*K > 2**31 case, torch.compile(fullgraph)
#                           with Inductor, time and peak memory vs torch's native bf16 cross_entropy
#                           (label_smoothing=0.1) and Liger (on a clone) when installed, ratio to the
#                           HBM bound, and a (BLOCK, num_warps) sweep for the launch table
#   nvidia-smi.txt, gpu_check.log
# Usage: bash bench/gpu_check.sh [extra gpu_check.py flags]
set -uo pipefail
cd "$(dirname "$0")/.."
# Refuse at once without a GPU: before the pytest run (minutes on a CPU) and before writing anything into
# bench/results/gpu/. On CPU, bench/gpu_check.py --dry_run with TRITON_INTERPRET=1 exercises the same code.
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device (or no torch in this Python); nothing run, nothing written." >&2
    echo "On CPU: TRITON_INTERPRET=1 python bench/gpu_check.py --dry_run --sweep --out_dir /tmp/gpu_check" >&2
    exit 2
fi
OUT=bench/results/gpu
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
timeout 150 python -m pytest -q -p no:cacheprovider -x tests/kernels/test_triton_rows.py tests/loss/test_gradients.py \
    tests/loss/test_functional.py > "$OUT/pytest.txt" 2>&1 || status=1
tail -3 "$OUT/pytest.txt"
timeout 200 python bench/gpu_check.py --out_dir "$OUT" --sweep "$@" 2>&1 | tee "$OUT/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check.sh: $([ $status -eq 0 ] && echo PASSED || echo FAILED); results in $OUT"
exit $status
