#!/bin/bash
# On the device machine (one H200, 16 cores): the GPU and many-core figures of issues 14 and 18.
# Prepare here first (benchmarks/device_prepare.sh), then, two calls back to back (the machine stays warm 30 s):
#     run(command="bash benchmarks/device_figures.sh accuracy", carry=[".device"], timeout_s=420)
#     run(command="bash benchmarks/device_figures.sh throughput", carry=[".device"], timeout_s=330)
# accuracy: benchmarks/accuracy.py on EMPIAR-10017 with the defaults and with the paper's recipe (U-Net++ /
# EfficientNet-b5 at 512², CD-CRF), trained and picked on the GPU; throughput: benchmarks/bench_distributed.py,
# CPU only (CUDA hidden) one process vs 1/4/8/16 Dask workers, then the GPU (one process, one GPU worker).
# Logs and tables go to $OUT (what the device tool brings back). Environment: T_DEFAULT, T_PAPER, T_CPU, T_GPU
# (seconds each part may take), N and REPEAT (the first N micrographs, each picked REPEAT times over), CPU_CONFIGS
# and GPU_CONFIGS (bench_distributed.py --configs), ACC_SET (extra --set arguments for accuracy.py), PAPER=0 (skip
# the paper recipe), INSTALL=0 (packages already there), PY (the Python). A smoke test here on 2 cores:
#     INSTALL=0 PY=.venv/bin/python PAPER=0 ACC_SET="--set default:train.epochs=1" bash benchmarks/device_figures.sh
#     INSTALL=0 PY=.venv/bin/python N=4 REPEAT=1 CPU_CONFIGS=one:1,dask:2x1 GPU_CONFIGS=one:2 \
#         bash benchmarks/device_figures.sh throughput
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-accuracy}
OUT=${OUT:-bench_out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CRISP_BENCH_DATA=$PWD/.device/data PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
if [ "${INSTALL:-1}" = 1 ]; then
    $PY -m pip install -q --no-index --no-deps .device/wheels/*.whl 2>&1 | tail -3
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
fi
{ nproc; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1;
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"
quiet() { grep -v -E "\[train [0-9]|\[pick [0-9]|\[crf [0-9]"; }
acc=bench_out/device_accuracy
model=$acc/empiar10017/default/model
case $part in
accuracy)
    timeout "${T_DEFAULT:-180}" $PY benchmarks/accuracy.py --threads 16 --scenes empiar10017 --candidates default \
        ${ACC_SET:-} --out $acc 2>&1 | tee "$OUT/accuracy_default.log" | quiet
    if [ "${PAPER:-1}" = 1 ]; then
        timeout "${T_PAPER:-220}" $PY benchmarks/accuracy.py --threads 16 --scenes empiar10017 --candidates paper \
            ${ACC_SET:-} --out $acc 2>&1 | tee "$OUT/accuracy_paper.log" | quiet
    fi
    cat $acc/empiar10017/*/result.json > "$OUT/accuracy_results.json" 2>/dev/null
    ;;
throughput)
    [ -f $model/weights.pt ] || { echo "no model at $model: run the accuracy part first"; exit 2; }
    mics=.device/data/empiar10017/micrographs
    cpu=${CPU_CONFIGS:-one:1,dask:1x1,one:16,dask:4x4,dask:8x2,dask:16x1}
    CUDA_VISIBLE_DEVICES= timeout "${T_CPU:-200}" $PY benchmarks/bench_distributed.py --model $model --mics $mics \
        --n "${N:-20}" --repeat "${REPEAT:-5}" --configs "$cpu" --out bench_out/device_cpu 2>&1 \
        | tee "$OUT/throughput_cpu.log"
    timeout "${T_GPU:-100}" $PY benchmarks/bench_distributed.py --model $model --mics $mics --n "${N:-20}" \
        --repeat "${REPEAT:-5}" --configs "${GPU_CONFIGS:-one:16,dask:1x16}" --out bench_out/device_gpu 2>&1 \
        | tee "$OUT/throughput_gpu.log"
    ;;
*) echo "usage: device_figures.sh accuracy|throughput"; exit 2 ;;
esac
