#!/usr/bin/env bash
# The GPU figures of issue 3 in three calls of the `device` tool (each call ≤ 10 min).
#
# Prepare here once per session: `bash benchmarks/prepare_device.sh` (writes the git-ignored .whl,
# .devdata and .devsvc folders, which travel with `carry`). Then, with the device tool:
#   run(command="bash benchmarks/device_suite.sh quick", carry=[".whl", ".devdata"])
#   run(command="bash benchmarks/device_suite.sh figures", carry=[".whl", ".devdata", ".devsvc"])
#   run(command="bash benchmarks/device_suite.sh cv", carry=[".whl", ".devdata"])
#   run(command="bash benchmarks/device_suite.sh final", carry=[".whl", ".devdata"])
#   run(command="bash benchmarks/device_suite.sh latency", carry=[".whl", ".devsvc"])
#
# Stages:
#   figures  the issue's GPU figures in one call of about 3 min (for a session lent 15 minutes of device
#            time): throughput with the slice alone (and its stages), with the views $VIEWS, with every
#            embedding copied to the cache, without helper threads, a profile of one pass, then click → mask latency through HTTP + Redis + an RQ worker
#   quick    for a session lent 15 minutes (one call, about 6 min): `levers`, then (a) and (b) with the GPU
#            default's six views on the GPU (eval_views.py, the six views only)
#   levers   pre-annotation throughput with each switch of workers/models/cuda_tuning.py (CUDA graphs,
#            cuDNN autotuner) and with the box alone, against the default on the same warm GPU, and
#            torch.profiler's GPU busy time of one pass with and without them (about 4 min)
#   views    the choice of views (the zoomed ones among them) and of the cut for box prompts
#            (eval_views.py --zoom), about 6 min
#   encoder_cv  5-fold CV of fine-tuning the image encoder with the decoder, scored with $VIEWS and with
#            the off-the-shelf and fine-tuned models averaged, ~9 min (95 s a fold on an H200): a call of its own
#   views_cv the CPU recipe's CV of fine-tuning, (a) and (b) scored with the views $VIEWS as well
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
DEFAULT_VIEWS=rot180,antitranspose,zoom,zoom_rot180,zoom_antitranspose   # workers.segmentation.DEFAULT_PROMPT_VIEWS

services() {  # redis-server and the pure-Python service wheels the device lacks (.devsvc)
    [ -d .devsvc/case ] || { echo ".devsvc missing: run benchmarks/prepare_device.sh and carry .devsvc"; return 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .devsvc/whl/*.whl || return 1
    chmod +x .devsvc/bin/redis-server
    export PATH=$PWD/.devsvc/bin:$PATH LD_LIBRARY_PATH=$PWD/.devsvc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    redis-server --version
}

levers() {
    local flags
    for flags in "" "--cudnn-benchmark" "--cuda-graphs" "--cuda-graphs --cudnn-benchmark" "--box-shrinks 0" \
            "--box-shrinks 0 --cuda-graphs --cudnn-benchmark"; do
        echo "== levers: ${flags:-default}"
        # shellcheck disable=SC2086
        timeout 90 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --repeats 2 $flags 2>&1
    done | tee "$out/levers.log"
    timeout 90 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --repeats 1 \
        --kernel-profile 25 2>&1 | tee "$out/levers_profile.log"
    timeout 90 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --repeats 1 \
        --kernel-profile 25 --cuda-graphs --cudnn-benchmark 2>&1 | tee "$out/levers_profile_graphs.log"
}

case "$stage" in
quick)
    levers
    timeout 240 "$PYTHON" benchmarks/eval_views.py --packed "$data" --views "${VIEWS:-$DEFAULT_VIEWS}" \
        --json "$out/views_default.json" 2>&1 | tee "$out/views_default.log"
    ;;
levers)
    levers
    ;;
figures)
    timeout 120 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --latency 50 --stages \
        2>&1 | tee "$out/throughput.log"
    timeout 100 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --latency 50 --repeats 2 \
        --views "${VIEWS:-$DEFAULT_VIEWS}" 2>&1 | tee "$out/throughput_views.log"
    timeout 60 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --repeats 2 --keep-embeddings \
        2>&1 | tee "$out/throughput_keep.log"
    timeout 60 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --repeats 1 --profile 25 \
        2>&1 | tee "$out/throughput_profile.log"
    timeout 60 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --repeats 2 --helper-threads 0 \
        2>&1 | tee "$out/throughput_no_helpers.log"
    if services; then
        timeout 180 "$PYTHON" benchmarks/bench_interactive.py --prepared .devsvc/case --slices "${SLICES:-8}" \
            --repeat "${REPEAT:-10}" 2>&1 | tee "$out/latency.log"
    fi
    ;;
views)  # the choice of views and of the cut for box prompts
    timeout 420 "$PYTHON" benchmarks/eval_views.py --packed "$data" --zoom --cuts=-2,-1.5,-1,-0.5,0,0.5 --json "$out/views.json" \
        2>&1 | tee "$out/views.log"
    ;;
encoder_cv)  # 5-fold CV of fine-tuning the image encoder too, (a) and (b) with $VIEWS and averaged models
    timeout "${CV_TIMEOUT:-560}" "$PYTHON" benchmarks/finetune_cv.py --packed "$data" --train-encoder \
        --max-samples "${SAMPLES:-1600}" --epochs "${CV_EPOCHS:-4}" --lr "${CV_LR:-2e-4}" --batch-size "$BATCH" \
        --train-box-shrinks "${TRAIN_SHRINKS:-2,4,6}" --views "${VIEWS:-$DEFAULT_VIEWS}" --no-propagation --average-models \
        --embedding-dir /tmp/sts-embeddings --json "$out/cv_encoder.json" 2>&1 | tr "\r" "\n" \
        | grep -v "s/step\|step/s" | tee "$out/cv_encoder.log"
    ;;
views_cv)  # the CPU recipe's 5-fold CV, (a) and (b) with $VIEWS averaged into box prompts, on the GPU
    timeout 30 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --repeats 1 --stages \
        2>&1 | tee "$out/stages.log"
    timeout 450 "$PYTHON" benchmarks/finetune_cv.py --packed "$data" --max-samples 1000 --epochs 1 --lr 2e-4 \
        --views "${VIEWS:-$DEFAULT_VIEWS}" --no-propagation --embedding-dir /tmp/sts-embeddings \
        --json "$out/cv_views.json" 2>&1 | tr "\r" "\n" | grep -v "s/step\|step/s" | tee "$out/cv_views.log"
    ;;
cv)
    timeout 120 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --latency 50 \
        2>&1 | tee "$out/throughput.log"
    timeout 90 "$PYTHON" benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --latency 50 --repeats 1 \
        --views flip_x 2>&1 | tee "$out/throughput_mirror.log"
    timeout 180 "$PYTHON" benchmarks/finetune_cv.py --packed "$data" --epochs "$EPOCHS" --lr "$LR" \
        --batch-size "$BATCH" --views flip_x --json "$out/cv_decoder.json" 2>&1 | tr "\r" "\n" | grep -v "s/step\|step/s" | tee "$out/cv_decoder.log"
    timeout 330 "$PYTHON" benchmarks/finetune_cv.py --packed "$data" --epochs "$EPOCHS" --lr "$LR" \
        --batch-size "$BATCH" --train-encoder --views flip_x --json "$out/cv_encoder.json" 2>&1 | tr "\r" "\n" | grep -v "s/step\|step/s" \
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
    services || exit 1
    timeout 500 "$PYTHON" benchmarks/bench_interactive.py --prepared .devsvc/case --slices "${SLICES:-8}" --repeat "${REPEAT:-10}" \
        2>&1 | tee "$out/latency.log"
    ;;
*)
    echo "unknown stage $stage (quick | levers | figures | views | views_cv | encoder_cv | cv | final | latency)"; exit 2 ;;
esac
