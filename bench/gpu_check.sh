#!/usr/bin/env bash
# One time-boxed GPU check for a single-GPU job with a wall-time limit and no network (an air-gapped
# cluster node): every part runs in order, each in its own time box cut from one overall deadline,
# and each part's JSON and log land in OUTDIR the moment that part ends, so a run cut off by the
# scheduler still returns everything that finished.
#
#   bench/gpu_check.sh OUTDIR [--budget SECONDS] [--dry-run] [--wheels DIR] [--only PARTS]
#                             [--part-budget PART=SECONDS ...]
#   bench/gpu_check.sh --record-sha     write GIT_SHA at the repository root, then exit
#
# Parts, in order (name: what):
#   env       nvidia-smi, Python/torch/triton/DALI versions, the git SHA (.git or the GIT_SHA file)
#   wheels    offline install of the extras packed by bench/offline_extras.sh (only with --wheels)
#   parity    bf16 parity of both kernels at the training shapes (pytest -m gpu, bf16 parity tests)
#   kernels   python -m bench.kernels (shapes from the vits16-xattn-path preset)
#   step      python -m bench.step on synthetic batches, vits16-path and vits16-vicreg, eager and compiled
#             (torch.compile, the trainer's --run.compile=true; compile time reported apart)
#   pipeline  python -m bench.pipeline (the reference loader always; DALI when it imports)
#   gpu       the rest of pytest -m gpu (neither the parity part's tests nor fp32)
#   fp32      the fp32 gpu tests, last: the slowest to compile and the least needed
# --budget (default 540 s) is the whole run; --part-budget caps one part (e.g. step=60). A part gets
# min(its cap, what is left before the deadline); with under MIN_PART_S (10 s) left, it is skipped.
# --dry-run runs the same sequence on the CPU with tiny sizes (under 2 minutes; tests use it); its step
# part times eager only (inductor takes minutes per graph on a CPU; tests/train/test_step_bench.py
# covers the compiled mode there).
# --only env,step runs a subset. Writes OUTDIR/NN-PART.json (status ok|failed|timeout|skipped, exit
# code, seconds, the time box, provenance) and OUTDIR/NN-PART.log per part, the benches' own JSONs,
# pytest's junit XML, and OUTDIR/summary.json + OUTDIR/SUMMARY.txt naming what ran, what was skipped
# and why. .git rarely travels to such a node: run `bench/gpu_check.sh --record-sha` before copying.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
PARTS=(env wheels parity kernels step pipeline gpu fp32)
# per-part caps (seconds) before --part-budget; the deadline cuts them further
declare -A CAP=([env]=40 [wheels]=90 [parity]=120 [kernels]=120 [step]=240 [pipeline]=120 [gpu]=150 [fp32]=600)
MIN_PART_S=${MIN_PART_S:-10}
GRACE_S=5  # SIGTERM first; SIGKILL this long after

usage() {
    sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

record_sha() {
    local sha
    sha=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null) || return 1
    git -C "$ROOT" diff --quiet HEAD -- . ':(exclude)bench/results' 2>/dev/null || sha="$sha-dirty"
    echo "$sha" > "$ROOT/GIT_SHA"
}

if [[ "${1:-}" == "--record-sha" ]]; then
    record_sha && echo "wrote $ROOT/GIT_SHA: $(cat "$ROOT/GIT_SHA")" && exit 0
    echo "error: $ROOT is not a git checkout; nothing to record" >&2
    exit 1
fi
[[ $# -ge 1 && "${1:0:1}" != "-" ]] || usage
OUT=$1
shift
BUDGET=540 DRY=0 WHEELS="" ONLY=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --only) ONLY=${2:?--only needs a comma list}; shift 2 ;;
        --part-budget)
            spec=${2:?--part-budget needs PART=SECONDS}
            [[ -n "${CAP[${spec%%=*}]+x}" ]] || { echo "error: --part-budget: unknown part '${spec%%=*}' (parts: ${PARTS[*]})" >&2; exit 2; }
            CAP[${spec%%=*}]=${spec#*=}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "error: unknown argument '$1'" >&2; usage ;;
    esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "error: --budget '$BUDGET' is not a whole number of seconds" >&2; exit 2; }
if [[ -n "$WHEELS" && ! -d "$WHEELS" ]]; then
    echo "error: --wheels $WHEELS is not a folder (make one with bench/offline_extras.sh pack)" >&2
    exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ -d .git ]] && record_sha  # the SHA travels with the tree as GIT_SHA where .git does not
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY_ROWS=()

if [[ $DRY == 1 ]]; then
    # the same sequence on the CPU, tiny: Triton in its interpreter, gpu tests collected and skipped
    # and bench/results of the tree left alone (CPU figures there are made on purpose, not by a dry run)
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 EQRECON_RESULTS_DIR="$OUT/bench-results"
    TINY_STEP=(--device cpu --steps 1 --warmup 1 --data.batch_size=2 --data.img_size=32 --data.target_size=32
               --model.dec_depth=2 --model.depth=2 --modes eager)
fi

provenance_json() {
    "$PYTHON" -c "import json; from train.provenance import provenance; print(json.dumps(provenance()))" 2>/dev/null \
        || echo '{"error": "train.provenance did not import"}'
}

json_str() {  # a shell string as a JSON string
    "$PYTHON" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"
}

write_part() {  # index name status rc seconds box reason
    local file
    file=$(printf '%s/%02d-%s.json' "$OUT" "$1" "$2")
    cat > "$file.tmp" <<EOF
{"part": "$2", "index": $1, "status": "$3", "exit_code": $4, "seconds": $5, "time_box_s": $6,
 "reason": $(json_str "$7"), "dry_run": $([[ $DRY == 1 ]] && echo true || echo false),
 "provenance": ${PROVENANCE:-null}}
EOF
    mv "$file.tmp" "$file"
    SUMMARY_ROWS+=("$2|$3|$5|$7")
    printf '%-9s %-8s %5ss  %s\n' "$2" "$3" "$5" "$7"
}

part_command() {  # name -> the command line, in PART_CMD
    local junit="--junitxml=$OUT/$(printf %02d "$1")-$2.xml"
    local pytest=("$PYTHON" -m pytest -q -p no:cacheprovider "$junit")
    case "$2" in
        env)
            PART_CMD=(bash -c "nvidia-smi || echo 'nvidia-smi: not available'; $PYTHON -m pip list 2>/dev/null | grep -iE '^(torch|triton|nvidia-dali|webdataset|timm|numpy) '; cat GIT_SHA 2>/dev/null || true") ;;
        wheels)
            PART_CMD=(bash bench/offline_extras.sh install "$WHEELS" "$EXTRAS") ;;
        parity)
            PART_CMD=("${pytest[@]}" -m gpu tests/kernels/test_cross_attention.py tests/kernels/test_recon_loss.py -k "parity and bf16") ;;
        kernels)
            if [[ $DRY == 1 ]]; then
                PART_CMD=("$PYTHON" -m bench.kernels --device cpu --preset demo-xattn-path --batch 1 --no-compile --reps 1 --out "$OUT")
            else
                PART_CMD=("$PYTHON" -m bench.kernels --preset vits16-xattn-path --out "$OUT")
            fi ;;
        step)
            if [[ $DRY == 1 ]]; then
                PART_CMD=("$PYTHON" -m bench.step --presets vits16-path,vits16-vicreg --sources synthetic "${TINY_STEP[@]}" --out "$OUT")
            else
                PART_CMD=("$PYTHON" -m bench.step --presets vits16-path,vits16-vicreg --sources synthetic --modes eager,compiled --out "$OUT")
            fi ;;
        pipeline)
            if [[ $DRY == 1 ]]; then
                PART_CMD=("$PYTHON" -m bench.pipeline --images 64 --batch 8 --warmup 1 --size 64 --workers 2 --out "$OUT")
            else
                PART_CMD=("$PYTHON" -m bench.pipeline --out "$OUT")
            fi ;;
        gpu)
            PART_CMD=("${pytest[@]}" -m gpu "${GPU_TEST_FILES[@]}" -k "not fp32 and not (parity and bf16)") ;;
        fp32)
            PART_CMD=("${pytest[@]}" -m gpu "${GPU_TEST_FILES[@]}" -k "fp32") ;;
    esac
}

EXTRAS="${TMPDIR:-/tmp}/eqrecon-extras"
# the test files that hold gpu-marked tests: collecting only these saves importing the whole suite
mapfile -t GPU_TEST_FILES < <(grep -rlE "pytest\.mark\.gpu" tests --include='test_*.py' | sort)
PROVENANCE=""
index=0
for name in "${PARTS[@]}"; do
    idx=$index
    index=$((index + 1))
    if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then
        continue
    fi
    if [[ $name == wheels && -z "$WHEELS" ]]; then
        write_part "$idx" "$name" skipped null 0 0 "no --wheels folder given"
        continue
    fi
    now=$(date +%s)
    left=$((DEADLINE - now))
    box=${CAP[$name]}
    ((box > left)) && box=$left
    if ((left < MIN_PART_S)); then
        write_part "$idx" "$name" skipped null 0 "$box" "deadline: ${left}s left of the ${BUDGET}s budget"
        continue
    fi
    part_command "$idx" "$name"
    log=$(printf '%s/%02d-%s.log' "$OUT" "$idx" "$name")
    t0=$(date +%s.%N)
    timeout --signal=TERM --kill-after=$GRACE_S "$box" "${PART_CMD[@]}" > "$log" 2>&1
    rc=$?
    secs=$("$PYTHON" -c "import sys; print(round($(date +%s.%N) - float(sys.argv[1]), 1))" "$t0")
    if ((rc == 124 || rc == 137)); then
        status=timeout reason="killed by its ${box}s time box"
    elif ((rc == 0)); then
        status=ok reason=""
    elif [[ $name == parity || $name == gpu || $name == fp32 ]] && ((rc == 5)); then
        status=ok reason="no tests collected"
    else
        status=failed reason="exit code $rc; see $(basename "$log")"
    fi
    if [[ $name == env ]]; then
        PROVENANCE=$(provenance_json)
    elif [[ $name == wheels && $status == ok ]]; then
        export PYTHONPATH="$EXTRAS:$PYTHONPATH"
    fi
    write_part "$idx" "$name" "$status" "$rc" "$secs" "$box" "$reason"
done

total=$(($(date +%s) - START))
{
    echo "gpu_check: ${total}s of a ${BUDGET}s budget$([[ $DRY == 1 ]] && echo ' (dry run on the CPU)')"
    for row in "${SUMMARY_ROWS[@]}"; do
        IFS='|' read -r n s t r <<< "$row"
        printf '%-9s %-8s %6ss  %s\n' "$n" "$s" "$t" "$r"
    done
} > "$OUT/SUMMARY.txt"
"$PYTHON" - "$OUT" "$total" "$BUDGET" "$DRY" "${SUMMARY_ROWS[@]}" <<'EOF'
import json, sys
out, total, budget, dry, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5:]
parts = []
for row in rows:
    name, status, seconds, reason = row.split("|", 3)
    parts.append({"part": name, "status": status, "seconds": float(seconds), "reason": reason})
summary = {"seconds": total, "budget_s": budget, "dry_run": dry, "parts": parts,
           "ran": [p["part"] for p in parts if p["status"] in ("ok", "failed", "timeout")],
           "skipped": {p["part"]: p["reason"] for p in parts if p["status"] == "skipped"}}
with open(f"{out}/summary.json", "w") as f:
    json.dump(summary, f, indent=2)
EOF
cat "$OUT/SUMMARY.txt"
