#!/usr/bin/env bash
# The GPU figures of issue 3 in three calls of the `device` tool (each call ≤ 10 min).
#
# Prepare here once per session: `bash benchmarks/prepare_device.sh` (writes the git-ignored .whl,
# .devdata and .devsvc folders, which travel with `carry`). Then, with the device tool:
#   run(command="bash benchmarks/device_suite.sh cv", carry=[".whl", ".devdata"])
#   run(command="bash benchmarks/device_suite.sh final", carry=[".whl", ".devdata"])
#   run(command="bash benchmarks/device_suite.sh latency", carry=[".whl", ".devsvc"])
#
# Stages:
#   cv       throughput + latency (bench_preannotate.py), then 5-fold patient-level CV of fine-tuning the
#            decoder only and the encoder too (finetune_cv.py); logs and JSON under $OUT
#   final    train on all 25 patients with the chosen recipe ($RECIPE: decoder|encoder) and bring the
#            checkpoint back in pieces under 16 MiB ($OUT/litemedsam_ft.pt.part-*; `cat` them together)
#   latency  click → mask through HTTP + Redis + an RQ worker on the GPU (bench_interactive.py on the
#            phantom case prepared here), p50/p95 cold, cache-warm and case-warmed
set -uo pipefail
stage=${1:-cv}
PYTHON=${PYTHON:-python3}  # the device's python3 holds torch; here: PYTHON=.venv/bin/python to try a stage
out=${OUT:-/tmp/sts-device-out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: carry .whl (see the header)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
data=.devdata/ibsi.npz
if [ "$stage" != latency ] && [ ! -f "$data" ]; then
    echo "$data missing: run benchmarks/prepare_device.sh and carry .devdata"; exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
EPOCHS=${EPOCHS:-20}
LR=${LR:-1e-4}
BATCH=${BATCH:-32}

case "$stage" in
cv)
    timeout 120 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --latency 50 \
        2>&1 | tee "$out/throughput.log"
    timeout 90 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --latency 50 --repeats 1 \
        --mirror 0.5 2>&1 | tee "$out/throughput_mirror.log"
    timeout 180 "$PYTHON" benchmarks/finetune_cv.py --packed "$data" --epochs "$EPOCHS" --lr "$LR" \
        --batch-size "$BATCH" --mirror 0.5 --json "$out/cv_decoder.json" 2>&1 | tr "\r" "\n" | grep -v "s/step\|step/s" | tee "$out/cv_decoder.log"
    timeout 330 "$PYTHON" benchmarks/finetune_cv.py --packed "$data" --epochs "$EPOCHS" --lr "$LR" \
        --batch-size "$BATCH" --train-encoder --mirror 0.5 --json "$out/cv_encoder.json" 2>&1 | tr "\r" "\n" | grep -v "s/step\|step/s" \
        | tee "$out/cv_encoder.log"
    ;;
final)
    recipe=${RECIPE:-encoder}
    flag=""; [ "$recipe" = encoder ] && flag="--train-encoder"
    timeout 400 "$PYTHON" benchmarks/finetune_cv.py --packed "$data" --epochs "$EPOCHS" --lr "$LR" \
        --batch-size "$BATCH" $flag --train-all "$out/litemedsam_ft.pt" 2>&1 | tr "\r" "\n" | grep -v "s/step\|step/s" | tee "$out/final.log"
    sha256sum "$out/litemedsam_ft.pt" | tee "$out/litemedsam_ft.pt.sha256"
    split -b 15M -d "$out/litemedsam_ft.pt" "$out/litemedsam_ft.pt.part-" && rm "$out/litemedsam_ft.pt"
    ls -la "$out"
    ;;
latency)
    [ -d .devsvc/case ] || { echo ".devsvc missing: run benchmarks/prepare_device.sh and carry .devsvc"; exit 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .devsvc/whl/*.whl || exit 1
    chmod +x .devsvc/bin/redis-server
    export PATH=$PWD/.devsvc/bin:$PATH LD_LIBRARY_PATH=$PWD/.devsvc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    redis-server --version || exit 1
    timeout 500 "$PYTHON" benchmarks/bench_interactive.py --prepared .devsvc/case --slices "${SLICES:-8}" --repeat "${REPEAT:-10}" \
        2>&1 | tee "$out/latency.log"
    ;;
*)
    echo "unknown stage $stage (cv | final | latency)"; exit 2 ;;
esac
