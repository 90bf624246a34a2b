#!/usr/bin/env bash
# Fetch the real images of the science run (bench/science.py) into RAW, offline-installable sources only:
#   - the photos bundled in the scikit-image wheel (skimage/data; CC0 / public domain),
#   - Debian's opencv-doc (examples/data, text, ...: test photos) and lomiri-wallpapers-16.04 (15 photos),
#   - Debian's dataset-fashion-mnist (70k labelled 28x28 greyscale images, idx format).
# Packages are downloaded and unpacked (`apt-get download` + `dpkg -x`), never installed.
# Usage: bench/science_data.sh RAW [PYTHON]     (idempotent: a finished RAW is left as it is)
set -euo pipefail
RAW=${1:?usage: bench/science_data.sh RAW [PYTHON]}
PY=${2:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # survives the cd below
mkdir -p "$RAW"
RAW=$(cd "$RAW" && pwd)
[ -f "$RAW/.done" ] && { echo "science data: $RAW already fetched"; exit 0; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# apt-get download writes into the current folder; run as root it warns that _apt cannot reach it.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then apt-get update -qq; fi
apt-get download -qq opencv-doc lomiri-wallpapers-16.04 dataset-fashion-mnist 2>/dev/null \
  || { echo "science data: apt-get download failed (need Debian's package index: run apt-get update)" >&2; exit 1; }
for deb in ./*.deb; do dpkg -x "$deb" "$RAW/debian"; done

"$PY" -m pip download --quiet --no-deps --only-binary=:all: scikit-image -d "$work/wheel"
"$PY" - "$work"/wheel/scikit_image-*.whl "$RAW/skimage" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    z.extractall(out, [n for n in z.namelist() if n.startswith("skimage/data/")])
EOF
touch "$RAW/.done"
echo "science data: fetched into $RAW"
