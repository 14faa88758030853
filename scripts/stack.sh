#!/usr/bin/env bash
# Run the stack on one machine without Docker, in the foreground (Ctrl-C stops it):
#   Redis (the machine's, or one started here), Label Studio on 127.0.0.1:${STS_LS_PORT:-8080},
#   an RQ worker (sts-worker, CUDA if present else CPU), the ML backend on 127.0.0.1:${STS_BACKEND_PORT:-9090}
#   connected to the project, then import a patient: the bundled phantom example (default) or --patient DIR.
#
#   ./scripts/stack.sh up [--patient DIR --patient-id ID] [--no-wait]
#
# State lives in ${STS_STACK_DIR:-.stack}/: Label Studio's database, the case store (data/), and
# credentials.env with the admin login and API token (generated once, kept between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

command="${1:-up}"; shift || true
[[ "$command" == "up" ]] || { echo "usage: $0 up [--patient DIR --patient-id ID] [--no-wait]" >&2; exit 2; }
patient=""; patient_id=""; wait_forever=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --patient) patient="$2"; shift 2 ;;
    --patient-id) patient_id="$2"; shift 2 ;;
    --no-wait) wait_forever=0; shift ;;
    --demo) shift ;;  # the default
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

bash scripts/install.sh
stack="${STS_STACK_DIR:-$repo/.stack}"
port="${STS_LS_PORT:-8080}"
mkdir -p "$stack/label-studio" "$stack/data"
if [[ ! -f "$stack/credentials.env" ]]; then
  umask 077
  cat > "$stack/credentials.env" <<CRED
LABEL_STUDIO_USERNAME=admin@example.org
LABEL_STUDIO_PASSWORD=$(openssl rand -hex 12)
LABEL_STUDIO_API_KEY=$(openssl rand -hex 20)
CRED
fi
# shellcheck disable=SC1091
source "$stack/credentials.env"

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no --dir "$stack" \
    --logfile "$stack/redis.log"
  echo "started redis-server on 127.0.0.1:6379"
fi

ls_bin="${LABEL_STUDIO_BIN:-$HOME/.cache/sts-annotate/ls-1.23.2/bin/label-studio}"
if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
  echo "something already answers on port $port; set STS_LS_PORT to another port" >&2
  exit 1
fi
env -u DEBUG -u PORT -u HOST -u USERNAME -u PASSWORD \
  LABEL_STUDIO_BASE_DATA_DIR="$stack/label-studio" \
  LABEL_STUDIO_USERNAME="$LABEL_STUDIO_USERNAME" LABEL_STUDIO_PASSWORD="$LABEL_STUDIO_PASSWORD" \
  LABEL_STUDIO_USER_TOKEN="$LABEL_STUDIO_API_KEY" LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
  LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="$stack" \
  LABEL_STUDIO_ML_BLOCK_LOCAL_IP=false LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false \
  LABEL_STUDIO_HOST="http://127.0.0.1:$port" LABEL_STUDIO_COLLECT_ANALYTICS=false \
  LABEL_STUDIO_LATEST_VERSION_CHECK=false LABEL_STUDIO_SENTRY_DSN= LABEL_STUDIO_FRONTEND_SENTRY_DSN= \
  setsid "$ls_bin" start --no-browser --internal-host 127.0.0.1 --port "$port" \
  > "$stack/label-studio.log" 2>&1 &
ls_pid=$!
pids=("$ls_pid")
trap 'for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || true; done' EXIT INT TERM
printf "starting Label Studio (log: %s)" "$stack/label-studio.log"
for _ in $(seq 1 240); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 "$ls_pid" 2>/dev/null || { echo; tail -20 "$stack/label-studio.log"; exit 1; }
  printf "."; sleep 1
done
echo
curl -fsS "http://127.0.0.1:$port/health" >/dev/null || { echo "Label Studio did not come up" >&2; exit 1; }

export STS_DATA_DIR="$stack/data" LABEL_STUDIO_URL="http://127.0.0.1:$port" LABEL_STUDIO_API_KEY
export LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="$stack" STS_IMAGE_SERVING=local-files
backend_port="${STS_BACKEND_PORT:-9090}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export STS_EMBEDDING_CACHE="${STS_EMBEDDING_CACHE:-$HOME/.cache/sts-annotate/embeddings}"  # slices embedded ahead of clicks
setsid .venv/bin/sts-worker > "$stack/worker.log" 2>&1 &
pids+=("$!")
setsid .venv/bin/sts-backend --host 127.0.0.1 --port "$backend_port" > "$stack/backend.log" 2>&1 &
pids+=("$!")
echo "started sts-worker (log: $stack/worker.log) and sts-backend on :$backend_port (log: $stack/backend.log)"

if [[ -z "$patient" ]]; then
  patient="$stack/example"
  patient_id="${patient_id:-DEMO-0001}"
  .venv/bin/python -m importers.phantom "$patient" --tissue Myxoid --seed 7 --overwrite
  .venv/bin/import-patient "$patient" --patient-id "$patient_id" --tumor-type "myxofibrosarcoma (phantom)" \
    --tissue Myxoid --anatomy thigh
else
  [[ -n "$patient_id" ]] || { echo "--patient needs --patient-id" >&2; exit 2; }
  .venv/bin/import-patient "$patient" --patient-id "$patient_id"
fi

# Connect the ML backend to the project (interactive), once.
.venv/bin/python - "$backend_port" <<'PY'
import os, sys, time
import requests
from core.ls_client import call, connect, find_project
port = sys.argv[1]
for _ in range(60):
    try:
        if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
            break
    except requests.RequestException:
        pass
    time.sleep(1)
client = connect(os.environ["LABEL_STUDIO_URL"], os.environ["LABEL_STUDIO_API_KEY"])
project = find_project(client, os.environ.get("STS_LS_PROJECT", "Soft-tissue tumours (MRI)"))
url = f"http://127.0.0.1:{port}"
if project is not None and not any(b.url.rstrip("/") == url for b in call("list ML backends", client.ml.list, project=project)):
    call("connect the ML backend", client.ml.create, project=project, url=url, title="sts segmentation",
         is_interactive=True)
    print(f"connected the ML backend {url} to project {project}")
PY

cat <<MSG

Label Studio: http://127.0.0.1:$port   login $LABEL_STUDIO_USERNAME / password in $stack/credentials.env
To import more patients in another shell:
  set -a; source $stack/credentials.env; set +a
  STS_DATA_DIR=$stack/data LABEL_STUDIO_URL=http://127.0.0.1:$port LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=$stack \\
    .venv/bin/import-patient DIR --patient-id ID
MSG
if [[ $wait_forever == 1 ]]; then
  echo "Ctrl-C stops Label Studio, the backend and the worker."
  wait "$ls_pid"
fi
