#!/usr/bin/env bash
# Install a wheelhouse built by bench/make_wheelhouse.sh, offline: each package it lists (packages.txt) with
# `pip install --no-index --find-links WHEELHOUSE`, so what is already installed (torch, ...) is kept and one
# package that cannot install does not stop the others. Exit 1 when any listed package failed to install.
#
#   bash bench/install_wheelhouse.sh [WHEELHOUSE]        # default wheelhouse/; PY=python to choose the Python
set -uo pipefail
WH=${1:-wheelhouse}
PY=${PY:-$(command -v python3 || command -v python)}
[ -f "$WH/packages.txt" ] || { echo "install_wheelhouse.sh: error: $WH/packages.txt does not exist" >&2; exit 2; }
ok=""; bad=""
while read -r name; do
    case $name in ""|"#"*) continue ;; esac
    if out=$("$PY" -m pip install --no-index --find-links "$WH" --disable-pip-version-check -q "$name" 2>&1); then
        ok="$ok $name"
    else
        bad="$bad $name"
        echo "$name: $(echo "$out" | grep -E 'ERROR' | head -2 | tr '\n' ' ')"
    fi
done < "$WH/packages.txt"
echo "installed:${ok:- none}"
if [ -n "$bad" ]; then
    echo "not installable here:$bad"
    exit 1
fi
