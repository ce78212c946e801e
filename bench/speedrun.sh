#!/usr/bin/env bash
# The CPU speedrun (docs/speedrun.md) and nanoGPT's CPU recipe, one after the other on this
# machine: each run's wall time and val loss, then the ratios.
#
#   bash bench/speedrun.sh path/to/nanoGPT          # 3 runs of ours, then nanoGPT's recipe
#   RUNS=1 NANOGPT_ITERS=8000 bash bench/speedrun.sh path/to/nanoGPT
#
# path/to/nanoGPT: a checkout of https://github.com/karpathy/nanoGPT with its
# data/shakespeare_char/input.txt (tinyshakespeare: copied there, it is not downloaded). Ours
# reads data/shakespeare_char/, prepared from the same file (python data/shakespeare_char/prepare.py).
# nanoGPT's recipe is its README's CPU command ("I only have a macbook"): 4 x 128, batch 12 x 64,
# NANOGPT_ITERS iterations (default 2000, the README's), its val loss estimated on 20 batches;
# ours is scored on all of val. PYTHON (default python3) runs both.
set -euo pipefail
NANOGPT=${1:?usage: bash bench/speedrun.sh path/to/nanoGPT}
RUNS=${RUNS:-3}
ITERS=${NANOGPT_ITERS:-2000}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
[[ -f $NANOGPT/train.py && -f $NANOGPT/data/shakespeare_char/input.txt ]] || {
    echo "error: $NANOGPT is not a nanoGPT checkout with data/shakespeare_char/input.txt" >&2; exit 2; }
[[ -f data/shakespeare_char/val.bin ]] || {
    echo "error: prepare ours first: python data/shakespeare_char/prepare.py" >&2; exit 2; }
LOGS=$(mktemp -d)

timed() {  # LOG DIR COMMAND...: run COMMAND in DIR, its output to LOG; prints its wall seconds
    local log=$1 dir=$2 start
    shift 2
    start=$(date +%s.%N)
    (cd "$dir" && "$@") >"$log" 2>&1 || { echo "error: $* failed, see $log" >&2; exit 1; }
    awk -v end="$(date +%s.%N)" -v start="$start" 'BEGIN {print end - start}'
}

last_val() {  # the val loss of a run's last evaluation
    grep -E '^step [0-9]+:' "$1" | tail -1 | sed -E 's/.*val loss ([0-9.]+).*/\1/'
}

ours_times=()
for i in $(seq "$RUNS"); do
    wall=$(timed "$LOGS/ours$i.log" . "$PY" train.py config/train_shakespeare_char_cpu_5min.py \
        --out_dir="$LOGS/out-ours$i")
    ours_times+=("$wall")
    printf 'ours, run %d: val %s (all of val), %.1f s\n' "$i" "$(last_val "$LOGS/ours$i.log")" "$wall"
done
(cd "$NANOGPT" && "$PY" data/shakespeare_char/prepare.py >/dev/null)
wall=$(timed "$LOGS/nanogpt.log" "$NANOGPT" "$PY" train.py config/train_shakespeare_char.py \
    --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 \
    --n_layer=4 --n_head=4 --n_embd=128 --max_iters="$ITERS" --lr_decay_iters="$ITERS" --dropout=0.0 \
    --out_dir="$LOGS/out-nanogpt")
theirs=$(last_val "$LOGS/nanogpt.log")
printf "nanoGPT's CPU recipe, %d iters: val %s (20 batches), %.1f s\n" "$ITERS" "$theirs" "$wall"
ours=$(last_val "$LOGS/ours$RUNS.log")
mean=$(printf '%s\n' "${ours_times[@]}" | awk '{s += $1} END {print s / NR}')
awk -v ours="$ours" -v theirs="$theirs" -v mean="$mean" -v wall="$wall" -v runs="$RUNS" 'BEGIN {
    printf "ratios: val %.3f (ours / nanoGPT), wall %.2f (ours, mean of %d runs / nanoGPT)\n",
        ours / theirs, mean / wall, runs}'
echo "logs: $LOGS"
