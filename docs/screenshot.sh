#!/usr/bin/env bash
# Regenerate docs/demo_report.png and docs/demo_accuracy.png from a finished demo run:
#   rest-fast train --out runs/demo && bash docs/screenshot.sh runs/demo
# Needs headless chromium (Debian: apt-get install chromium).
set -euo pipefail
run=${1:?usage: docs/screenshot.sh RUN_DIR}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1000,2200 \
  --screenshot="$tmp/full.png" "file://$(cd "$run" && pwd)/report.html" 2>/dev/null
python - "$tmp/full.png" "$run/plots/accuracy.png" "$here" <<'PY'
import sys
from PIL import Image
full, acc, out = sys.argv[1:]
img = Image.open(full).convert("RGB")
img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.LANCZOS)
img.quantize(colors=128).save(f"{out}/demo_report.png", optimize=True)
a = Image.open(acc).convert("RGB")
a.quantize(colors=64).save(f"{out}/demo_accuracy.png", optimize=True)
PY
ls -la "$here"/demo_*.png
