#!/usr/bin/env bash
# Build wheelhouse/ for bench/gpu_suite.sh: what the GPU image lacks, as binary wheels for ITS Python and
# platform with their dependencies resolved there, at most 60 MiB so it travels with the working tree (the folder
# is git-ignored). Needs the package registry here, nothing there (bench/install_wheelhouse.sh installs it).
#
#   bash bench/make_wheelhouse.sh                 # the lent GPU image: CPython 3.12.3, manylinux x86_64
#   PYVER=3.11.7 BASE="torch==2.14.1 ..." DEST=/tmp/wh bash bench/make_wheelhouse.sh   # another target
#
# The GPU image has torch 2.11.0, triton 3.6.0, transformers 5.17.0, torchvision 0.26.0 (BASE), and pytest,
# pygments, hypothesis, pybind11, timm, tensorboard; it lacks open_clip_torch, av, nvidia-dali, faiss and
# webdataset. The wheelhouse carries PACKAGES (pytest, hypothesis, pybind11, av, open_clip_torch, webdataset)
# with the closure of their dependencies for that Python, minus BASE and its closure (bench/wheelhouse_plan.py),
# plus the direct dependencies of CARRY_DEPS_OF (the test tools: pytest's pygments, ...) even where the image
# has them, so the tests also install on a barer machine.
# nvidia-dali (~500 MB) and faiss-gpu cannot travel: the suite says DALI is not measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12.3}
BASE=${BASE:-"torch==2.11.0 triton==3.6.0 transformers==5.17.0 torchvision==0.26.0"}
PACKAGES=${PACKAGES:-"pytest hypothesis pybind11 av open_clip_torch webdataset"}
PLATFORMS=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 linux_x86_64"}
CARRY_DEPS_OF=${CARRY_DEPS_OF:-"pytest hypothesis"}
LIMIT_MB=${LIMIT_MB:-60}
DEST=${DEST:-wheelhouse}
PY=${PYTHON:-$(command -v python3 || command -v python)}
short=$(echo "$PYVER" | cut -d. -f1,2)
plat=(); for p in $PLATFORMS; do plat+=(--platform "$p"); done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "resolving for CPython $PYVER (metadata only): $PACKAGES, minus what has $BASE"
# shellcheck disable=SC2086
"$PY" bench/wheelhouse_plan.py --python-version "$PYVER" --base "$BASE" --carry-deps-of "$CARRY_DEPS_OF" \
    "${plat[@]}" $PACKAGES > "$tmp/plan.txt"
echo "wheels to fetch: $(tr '\n' ' ' < "$tmp/plan.txt")"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$short" --implementation cp \
    --abi "cp${short/./}" --abi abi3 --abi none "${plat[@]}" -d "$tmp/wheels" -q -r "$tmp/plan.txt" \
    2> >(grep -v "is ignored" >&2)
size=$(( ( $(cat "$tmp"/wheels/*.whl | wc -c) + 1048575 ) / 1048576 ))  # MiB, rounded up once
if [ "$size" -gt "$LIMIT_MB" ]; then
    echo "error: the wheels take ${size} MiB, over the ${LIMIT_MB} MiB limit; drop a package (PACKAGES=...)" >&2
    du -m "$tmp"/wheels/*.whl | sort -rn | head -5 >&2
    exit 2
fi
mkdir -p "$DEST"
# Replace only the files we write; anything else in $DEST is left alone.
mv -f "$tmp"/wheels/*.whl "$DEST"/
cp "$tmp/plan.txt" "$DEST/requirements.txt"
printf '%s\n' $PACKAGES > "$DEST/packages.txt"
echo "$DEST/: $(wc -l < "$DEST/requirements.txt") wheels, ${size} MiB (CPython $PYVER); carry it with the tree"
