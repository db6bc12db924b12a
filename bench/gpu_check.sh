#!/usr/bin/env bash
# The GPU check, in one call of under 9 minutes (150 + 130 + 200 + 60 s at most) on a lent GPU machine
# (nothing is installed from the network): the CUDA correctness tests, then the full-size benchmark
# in fp16 and bf16, then (with two GPUs or more) a torchrun evaluation on two GPUs (NCCL) against one
# process. Everything it prints also lands in $OUT (when set) or bench/out/.
#
#   device run:  bash bench/gpu_check.sh            (from the repository root; timeout_s 540)
#
# The machine's own python3 must hold torch, transformers, safetensors, typer, tqdm, pillow and
# matplotlib (the lent images do). CoCa's benchmark also needs open_clip: put its wheels in .whl/
# beforehand (pip download --no-deps -d .whl open_clip_torch ftfy wcwidth) and carry .whl.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/qpert-site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/qpert-site"
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/machine.txt"

status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.txt" || status=1
# bf16 also times the torch.compile'd vision encoder (its compile time is reported apart)
for run in "fp16 130" "bf16 200 --compile"; do
    set -- $run
    dtype=$1 limit=$2
    shift 2
    timeout "$limit" python3 bench/run.py --device cuda --dtype "$dtype" --sizes 224,364 --batch 32 --pairs 512 \
        --gallery 64 --k 16 --repeats 5 "$@" --json "$out/bench_$dtype.json" 2>&1 | tee "$out/bench_$dtype.txt" || status=1
done
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    QPERT_DISTRIBUTED_DEVICE=cuda timeout 60 python3 -m pytest -q -p no:cacheprovider \
        tests/test_distributed_eval.py -k json_of_one 2>&1 | tee "$out/torchrun_2gpu.txt" || status=1
else
    echo "one GPU: the 2-GPU torchrun check is skipped" | tee "$out/torchrun_2gpu.txt"
fi
exit $status
