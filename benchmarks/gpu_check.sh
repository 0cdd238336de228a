#!/usr/bin/env bash
# The GPU check of issue 18 item 7 ("GPU sites at full speed"), in one command.
#
# On a machine with a CUDA GPU and a CUDA build of torch in .venv. Sized for about 4 minutes
# on an H100 with 16 cores (an estimate: not run on a GPU yet); every phase has its own time
# limit, 7 minutes in all at worst:
#
#     bash benchmarks/gpu_check.sh                  # PYTHON=..., STEPS=20, BATCH=base=16 to change
#
# 1. the device and the torch build;
# 2. bench_encoder at `base` (ViT-B/16, 96^3): fedmri against MONAI, fp32 and bf16 autocast
#    (train.precision): samples/s, % of the matmul peak in that precision, the fused
#    attention kernel fedmri's call gets (flash expected under bf16);
# 3. the same for fedmri compiled (train.compile, bf16): the "warm-up s" column is the
#    compile time that a federated round may pay again;
# 4. the trainer tests of the precision path (tests/client/test_speed.py, whose CUDA test
#    runs a pretrain and an align round on the GPU: bf16, fused AdamW, pinned batches).
#
# Copy the tables into benchmarks/RESULTS.md with the machine and the date. Exits non-zero
# when a phase failed; the other phases still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-20}
BATCH=${BATCH:-base=16}
failed=()

phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, note a failure, go on
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== ${name} (limit ${limit} s) ==="
    local start=$SECONDS
    timeout "${limit}" "$@"
    local rc=$?
    echo "--- ${name}: exit ${rc}, $((SECONDS - start)) s"
    if [ "${rc}" -ne 0 ]; then failed+=("${name} (exit ${rc})"); fi
}

phase device 30 "$PYTHON" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: install a CUDA build of torch into the venv first")
from fedmri.client.trainers.speed import resolve_precision
p = torch.cuda.get_device_properties(0)
auto = resolve_precision("auto", "cuda")
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}; "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"train.precision=auto resolves to {auto} here")
'
[ ${#failed[@]} -eq 0 ] || { echo "gpu_check: no usable GPU, stopping"; exit 1; }

phase "encoder fp32+bf16 vs MONAI" 150 \
    "$PYTHON" benchmarks/bench_encoder.py --device cuda --presets base --precision fp32,bf16 \
    --steps "$STEPS" --batch "$BATCH"
phase "encoder compiled (bf16)" 150 \
    "$PYTHON" benchmarks/bench_encoder.py --device cuda --presets base --precision bf16 --models fedmri \
    --compile --steps "$STEPS" --batch "$BATCH"
phase "trainer tests" 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/client/test_speed.py

echo
if [ ${#failed[@]} -ne 0 ]; then
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: all phases passed"
