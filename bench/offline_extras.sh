#!/usr/bin/env bash
# Offline install of the GPU data-pipeline extras (NVIDIA DALI and its codec libraries, webdataset)
# for machines without internet access, e.g. air-gapped GPU clusters.
#
#   bench/offline_extras.sh pack [DIR]            on a machine with internet access: download the
#                                                 CPython 3.12 manylinux x86-64 wheels and split them
#                                                 into parts DIR/p1, DIR/p2, ... of at most 60 MiB
#                                                 (default DIR: .dev, which git ignores)
#   bench/offline_extras.sh install DIR TARGET    on the offline machine: join the parts, unpack the
#                                                 wheels into TARGET and print the PYTHONPATH line
#
# Copy DIR (the parts and MANIFEST) to the offline machine by any means. The wheels are installed with
# --no-deps: torch, numpy and the CUDA runtime must already be there. Versions can be pinned with
# environment variables, e.g. DALI_VERSION=2.4.0 bench/offline_extras.sh pack, and PYTHON names the
# interpreter whose pip is used (default python3).
set -euo pipefail

PYTHON=${PYTHON:-python3}
PART_SIZE=${PART_SIZE:-60m}  # at most 60 MiB per part
PY_VERSION=${PY_VERSION:-3.12}
# pip matches each manylinux tag exactly, so list the ones these wheels are published with
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_24_x86_64 manylinux1_x86_64)

pin() {  # name [version] -> name or name==version
    if [[ -n "${2:-}" ]]; then echo "$1==$2"; else echo "$1"; fi
}

# PACKAGES="name[==version] ..." replaces the default list below (e.g. to pack a different CUDA build)
WHEELS=(
    "$(pin nvidia-dali-cuda130 "${DALI_VERSION:-}")"
    # DALI's own dependencies (image codecs, nvJPEG, nvCOMP)
    "$(pin nvidia-nvimgcodec-cu13 "${NVIMGCODEC_VERSION:-}")"
    "$(pin nvidia-nvjpeg "${NVJPEG_VERSION:-}")"
    "$(pin nvidia-libnvcomp-cu13 "${NVCOMP_VERSION:-}")"
    "$(pin nvidia-nvjpeg2k-cu13 "${NVJPEG2K_VERSION:-}")"
    "$(pin nvidia-nvtiff-cu13 "${NVTIFF_VERSION:-}")"
    # the reference pipeline's shard reader
    "$(pin webdataset "${WEBDATASET_VERSION:-}")"
    "$(pin braceexpand "${BRACEEXPAND_VERSION:-}")"
)

if [[ -n "${PACKAGES:-}" ]]; then
    read -r -a WHEELS <<< "$PACKAGES"
fi

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

pack() {
    local dir=${1:-.dev}
    local wheels
    wheels=$(mktemp -d)
    local platform_args=()
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    echo "downloading ${#WHEELS[@]} wheels for CPython $PY_VERSION (manylinux x86-64) ..."
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "$PY_VERSION" "${platform_args[@]}" -d "$wheels" "${WHEELS[@]}"
    mkdir -p "$dir"
    rm -f "$dir"/p[0-9]* "$dir/MANIFEST"
    (cd "$wheels" && ls -1 -- *.whl) > "$dir/MANIFEST"
    # one archive of all wheels, cut into numbered parts that any transfer channel can carry
    tar -C "$wheels" -cf - . | split -b "$PART_SIZE" -d -a 3 - "$dir/p.tmp."
    local i=1
    for part in "$dir"/p.tmp.*; do
        mv "$part" "$dir/p$i"
        i=$((i + 1))
    done
    (cd "$dir" && sha256sum p[0-9]* > SHA256SUMS)
    rm -rf "$wheels"
    echo "wrote $((i - 1)) part(s) to $dir (wheels listed in $dir/MANIFEST):"
    ls -l "$dir"/p[0-9]*
}

install() {
    local dir=${1:?install needs the folder with the parts}
    local target=${2:?install needs a target folder for the packages}
    local parts
    # numeric order: p1 p2 ... p10, not p1 p10 p2
    parts=$(cd "$dir" && ls -1 p[0-9]* 2>/dev/null | sort -t p -k 2 -n)
    if [[ -z "$parts" ]]; then
        echo "error: no parts p1, p2, ... in $dir; run '$0 pack' first" >&2
        exit 1
    fi
    if [[ -f "$dir/SHA256SUMS" ]]; then
        (cd "$dir" && sha256sum --quiet -c SHA256SUMS) || { echo "error: a part in $dir is damaged" >&2; exit 1; }
    fi
    local wheels
    wheels=$(mktemp -d)
    # shellcheck disable=SC2086  # $parts is a list of plain file names
    (cd "$dir" && cat $parts) | tar -C "$wheels" -xf -
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$target" "$wheels"/*.whl
    echo "installed $(ls -1 "$wheels"/*.whl | wc -l) wheels into $target; use them with:"
    rm -rf "$wheels"
    echo "export PYTHONPATH=$(cd "$target" && pwd)\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
    pack) shift; pack "$@" ;;
    install) shift; install "$@" ;;
    *) usage ;;
esac
