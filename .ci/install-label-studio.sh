#!/usr/bin/env bash
# Install Label Studio into its own virtual environment (its pins fight the project's), idempotently.
#   LABEL_STUDIO_VENV  where to put it (default: ~/.cache/sts-annotate/ls-<version>)
#   LABEL_STUDIO_VERSION  (default 1.23.2; tests/services.py expects this one)
# Note: never probe with `label-studio --version`: in 1.23.2 it migrates ~/.local/share/label-studio
# and then starts a server on 0.0.0.0:8080. We ask the venv's Python for the package version instead.
set -euo pipefail

version="${LABEL_STUDIO_VERSION:-1.23.2}"
venv="${LABEL_STUDIO_VENV:-$HOME/.cache/sts-annotate/ls-$version}"
bin="$venv/bin/label-studio"

installed_version() {
  "$venv/bin/python" -c \
    "import importlib.metadata as m, label_studio; print(m.version('label-studio'))" 2>/dev/null || true
}

if [[ -x "$bin" && "$(installed_version)" == "$version" ]]; then
  echo "label-studio $version already installed: $bin"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  python="$(command -v python3.11 || command -v python3)"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "label-studio==$version"

if [[ ! -x "$bin" || "$(installed_version)" != "$version" ]]; then
  echo "label-studio $version install into $venv failed" >&2
  exit 1
fi
echo "installed label-studio $version into $venv"
