#!/usr/bin/env bash
# Build wheelhouse/ for bench/gpu_suite.sh: the optional packages a bare GPU machine lacks (torch, triton and
# transformers are assumed there), as binary wheels for ITS Python and platform, at most 60 MiB in all so it
# can be carried with the working tree (the folder is git-ignored). Needs network (PyPI) here, none there.
#
#   bash bench/make_wheelhouse.sh                 # for CPython 3.12, manylinux x86_64 (the lent H200 machines)
#   PYVER=3.11 bash bench/make_wheelhouse.sh      # another Python
#   LIMIT_MB=60 PACKAGES="pytest av" bash bench/make_wheelhouse.sh
#
# Default set: pytest (+ pluggy, iniconfig) for the GPU tests, pybind11 for the native caption cache, av (PyAV)
# for the decode/shard benches, pillow, hypothesis (+ attrs, sortedcontainers), webdataset (+ braceexpand).
# open_clip, faiss and DALI are left out: too large for the budget (DALI alone is ~500 MB) and no GPU step
# needs them; the suite skips what depends on them, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
LIMIT_MB=${LIMIT_MB:-60}
PACKAGES=${PACKAGES:-"pytest pluggy iniconfig packaging pybind11 av pillow hypothesis attrs sortedcontainers webdataset braceexpand"}
DEST=${DEST:-wheelhouse}
mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One package at a time: a package with no wheel for that Python is reported and left out, not fatal.
for p in $PACKAGES; do
    if python -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$tmp" -q "$p" > "$tmp/$p.log" 2>&1; then
        echo "ok       $p"
    else
        echo "no wheel $p (python $PYVER): $(tail -1 "$tmp/$p.log")"
    fi
done
rm -f "$tmp"/*.log
size=$(du -cm "$tmp"/*.whl 2>/dev/null | tail -1 | cut -f1)
if [ "${size:-0}" -gt "$LIMIT_MB" ]; then
    echo "error: the wheels take ${size} MiB, over the ${LIMIT_MB} MiB limit; drop a package (PACKAGES=...)" >&2
    exit 2
fi
# Replace only the wheels we write; anything else in $DEST is left alone.
mv -f "$tmp"/*.whl "$DEST"/
echo "$DEST/: $(ls "$DEST"/*.whl | wc -l) wheels, ${size} MiB (python $PYVER); carry it with the tree"
