#!/usr/bin/env bash
# Every CUDA figure the README's "On a GPU" asks for, in one go on one GPU: the CUDA tests,
# then decoding against transformers, then training and sampling on tinyshakespeare.
#
#   bash bench/gpu_check.sh                  # all three parts
#   bash bench/gpu_check.sh tests,decode     # some of them: tests, decode, train
#
# Each step stops after LIMIT seconds (default 300) with a line saying so, and the next one runs:
# a step that hangs costs its own time, not the rest of a lent GPU's.
# SHARED (default ../shared) holds data/tinyshakespeare/input.txt and tiktoken_cache/, as
# beside this repo's checkout; PYTHON (default python3) is the interpreter with CUDA torch.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=",${1:-tests,decode,train},"
SHARED=${SHARED:-../shared}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$SHARED/tiktoken_cache}
TIMEFORMAT="wall %R s"
LIMIT=${LIMIT:-300}

step() {  # a command, stopped after LIMIT seconds; its failure is printed and the script goes on
    timeout --kill-after=10 "$LIMIT" "$@"
    local rc=$?
    # on stderr, which no grep below filters
    if ((rc)); then echo "!! exit $rc$( ((rc == 124)) && echo ", over $LIMIT s"): $*" >&2; fi
    return $rc
}

cold_step() {  # step, compiling from an empty cache (inductor keeps Triton's kernels there too)
    local cache rc
    cache=$(mktemp -d)
    TORCHINDUCTOR_CACHE_DIR=$cache step "$@"
    rc=$?
    rm -rf "$cache"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

if [[ $PARTS == *,tests,* ]]; then
    echo "== CUDA tests"
    step $PY -m pytest -q tests/test_cuda.py tests/test_decode_speedups.py
fi

if [[ $PARTS == *,decode,* ]]; then
    echo "== batch-1 greedy decoding, bfloat16 (targets: >= 2x transformers eager, >= 1,000 tok/s compiled)"
    step $PY bench/generation.py --device=cuda --dtype=bfloat16 --compile=True --parts=gpt2 --repeat=3
    echo "== gpt2-xl shape (target: >= 300 tok/s compiled)"
    step $PY bench/generation.py --device=cuda --dtype=bfloat16 --compile=True --parts=gpt2 \
        --gpt2_size=gpt2-xl --repeat=2 --new_tokens=128
fi

if [[ $PARTS == *,train,* ]]; then
    echo "== prepare"
    step $PY data/shakespeare_char/prepare.py --input="$SHARED/data/tinyshakespeare/input.txt" || exit 1
    echo "== torchrun, one process, NCCL (it crashed once)"
    step $PY -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
        config/train_shakespeare_char.py --max_iters=40 --eval_interval=20 --eval_iters=5 \
        --out_dir=out-gpu-torchrun | tail -3
    # the timed runs compile from an empty cache, as a first run does (the torchrun step above
    # compiled the same model: its cached kernels would make the figure a second run's)
    echo "== config/train_shakespeare_char.py, compile cache empty (target: best val <= 1.47 in <= 60 s; nanoGPT 159 s)"
    time cold_step $PY train.py config/train_shakespeare_char.py | grep -E "^step|best|saving" | tail -6
    echo "== sample.py 10 x 500 characters (target: <= 8 s whole command; nanoGPT 33 s)"
    for flags in "" "--context_shift=True" "--compile=True"; do
        echo "-- sample.py $flags"
        time step $PY sample.py --out_dir=out-shakespeare-char --num_samples=10 --max_new_tokens=500 \
            $flags > /dev/null
    done
    echo "== peak FLOP/s: the datasheet's (hardware.GPU_PEAK_FLOPS) and the fallback's measured matmul"
    step $PY -c "import torch; from nanogpt import hardware
for precision in ('bfloat16', 'float32'):
    torch.backends.cuda.matmul.allow_tf32 = precision == 'float32'
    print(precision, 'table', hardware.peak_flops('cuda', precision) / 1e12,
          'measured', round(hardware.measure_matmul_flops('cuda', precision) / 1e12), 'TFLOP/s')"
    echo "== GPT-2 124M training step, bfloat16, compiled (target: >= 50% MFU)"
    step $PY bench/train_step.py --batch_size=12 --block_size=1024 --compile=True
    echo "== the char run again, evaluating as many rows in 50 batches of 256 (nanoGPT: 200 of 64), for the numbers to pick the recipe"
    time cold_step $PY train.py config/train_shakespeare_char.py --eval_batch_size=256 --eval_iters=50 \
        --out_dir=out-gpu-eval | grep -E "^step|best|saving" | tail -6
fi
