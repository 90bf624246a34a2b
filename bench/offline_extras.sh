#!/usr/bin/env bash
# Offline install of the GPU data-pipeline extras (NVIDIA DALI, everything it imports, webdataset)
# for machines without internet access, e.g. air-gapped GPU clusters. The list is
# bench/offline_extras.txt (pinned; see there).
#
#   bench/offline_extras.sh pack [DIR]            on a machine with internet access: pip-download the
#                                                 CPython 3.12 manylinux x86-64 wheels of the list and
#                                                 cut them into parts DIR/p1, DIR/p2, ... of at most
#                                                 60 MiB, with DIR/MANIFEST (the wheels) and
#                                                 DIR/SHA256SUMS (every part and every wheel)
#   bench/offline_extras.sh install DIR TARGET    on the offline machine: check the parts' checksums,
#                                                 join them, check every wheel's checksum and that
#                                                 every listed package has its wheel, install into
#                                                 TARGET, and check that `import nvidia.dali` works
#
# WHEELHOUSE=FOLDER bench/offline_extras.sh pack DIR packs the wheels already in FOLDER (the output of
# an earlier `pip download`) instead of downloading. Copy DIR to the offline machine by any means. The wheels are installed with --no-deps: torch, numpy
# and the CUDA runtime must already be there (the list's "provided" line). PYTHON names the
# interpreter whose pip is used (default python3); PY_VERSION the target's Python (default 3.12).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LIST=${LIST:-$HERE/offline_extras.txt}
PYTHON=${PYTHON:-python3}
PART_SIZE=${PART_SIZE:-60m}  # at most 60 MiB per part
PY_VERSION=${PY_VERSION:-3.12}
# pip matches each manylinux tag exactly, so list the ones these wheels are published with
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_24_x86_64 manylinux1_x86_64)

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

requirements() {  # the list's requirement lines
    grep -vE '^\s*(#|$)' "$LIST"
}

normalise() {  # distribution or wheel-file name -> PEP 503 name (lower case, runs of -_. as -)
    tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g'
}

pack() {
    local dir=${1:-.dev}
    local wheels
    wheels=$(mktemp -d)
    if [[ -n "${WHEELHOUSE:-}" ]]; then
        cp "$WHEELHOUSE"/*.whl "$wheels"/
    else
        local platform_args=()
        for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
        mapfile -t reqs < <(requirements)
        echo "downloading ${#reqs[@]} wheels for CPython $PY_VERSION (manylinux x86-64) ..."
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
            --python-version "$PY_VERSION" "${platform_args[@]}" -d "$wheels" "${reqs[@]}"
    fi
    mkdir -p "$dir"
    rm -f "$dir"/p[0-9]* "$dir/MANIFEST" "$dir/SHA256SUMS"
    (cd "$wheels" && ls -1 -- *.whl) > "$dir/MANIFEST"
    (cd "$wheels" && sha256sum -- *.whl) > "$dir/WHEELS.sha256"
    # one archive of all wheels (and their checksums), cut into numbered parts any channel can carry
    cp "$dir/WHEELS.sha256" "$wheels/"
    tar -C "$wheels" -cf - . | split -b "$PART_SIZE" -d -a 3 - "$dir/p.tmp."
    local i=1
    for part in "$dir"/p.tmp.*; do
        mv "$part" "$dir/p$i"
        i=$((i + 1))
    done
    (cd "$dir" && sha256sum p[0-9]* > SHA256SUMS && cat WHEELS.sha256 >> SHA256SUMS && rm WHEELS.sha256)
    rm -rf "$wheels"
    echo "wrote $((i - 1)) part(s) to $dir (wheels listed in $dir/MANIFEST, checksums in $dir/SHA256SUMS):"
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
    [[ -f "$dir/SHA256SUMS" ]] || { echo "error: $dir/SHA256SUMS is missing; re-run '$0 pack'" >&2; exit 1; }
    local bad
    bad=$(cd "$dir" && grep -E ' p[0-9]+$' SHA256SUMS | sha256sum -c 2>/dev/null | grep -v ': OK$' || true)
    [[ -z "$bad" ]] || { echo "error: damaged or missing part(s) in $dir: ${bad//$'\n'/, }" >&2; exit 1; }
    local wheels
    wheels=$(mktemp -d)
    # shellcheck disable=SC2086  # $parts is a list of plain file names
    (cd "$dir" && cat $parts) | tar -C "$wheels" -xf -
    bad=$(cd "$wheels" && sha256sum -c WHEELS.sha256 2>/dev/null | grep -v ': OK$' || true)
    [[ -z "$bad" ]] || { echo "error: damaged wheel(s) after joining the parts: ${bad//$'\n'/, }" >&2; exit 1; }
    local missing=() have
    have=$(cd "$wheels" && ls -1 -- *.whl | sed -E 's/-[0-9].*$//' | normalise)
    while read -r req; do
        local name
        name=$(echo "$req" | sed -E 's/[=<>!~ ;\[].*$//' | normalise)
        grep -qx "$name" <<< "$have" || missing+=("$req")
    done < <(requirements)
    if ((${#missing[@]})); then
        echo "error: the parts in $dir lack wheels for: ${missing[*]} (re-run '$0 pack' with the current list)" >&2
        exit 1
    fi
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$target" "$wheels"/*.whl
    echo "installed $(ls -1 "$wheels"/*.whl | wc -l) wheels into $target"
    rm -rf "$wheels"
    local err
    if ! err=$(PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "import nvidia.dali, webdataset" 2>&1); then
        echo "error: 'import nvidia.dali' fails after the install: $(echo "$err" | tail -1)" >&2
        exit 1
    fi
    echo "import nvidia.dali works; use the packages with:"
    echo "export PYTHONPATH=$(cd "$target" && pwd)\${PYTHONPATH:+:\$PYTHONPATH}"
}

case "${1:-}" in
    pack) shift; pack "$@" ;;
    install) shift; install "$@" ;;
    *) usage ;;
esac
