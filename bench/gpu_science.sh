#!/usr/bin/env bash
# The GPU science run as one time-boxed job for an air-gapped single-GPU node (one H100/H200, <= 8 min):
# vicreg, balanced path and balanced xattn (ViT-S/16 at 112 px, 600 steps, one seed: the "gpu-job"
# size of bench/science/sizes.py), the ridge probe and the report, archived into at most 8 files.
#
#   bench/gpu_science.sh --pack PACK.tar     where the registries are reachable: fetch the photos, cut
#                                            and convert the crops, pack the shards (<= 50 MiB)
#   bench/gpu_science.sh OUT --data PACK.tar [--budget SECONDS]      on the GPU node (default 480 s)
#   bench/gpu_science.sh OUT --dry-run       the same sequence on the CPU: the demo photos as data, the
#                                            CPU size's tiny ViT, 4 steps per run, the probe at
#                                            its minimum pairs (the tests run it)
# OUT receives: status.json (exit code, seconds, budget, dry run), job.log, science.json (the bench
# record with provenance and the as-run lr), science-r2.png, summary-partial.json and runs.tar.gz (each
# run's config.json, metrics.jsonl, train.json, probe.json, recon.png; no checkpoints). A node without
# DALI or webdataset trains on the reference loader (data.loader auto); bench/offline_extras.sh packs
# the wheels to install first. bench/results/ in the tree is never written.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
MAX_PACK_MB=50

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

if [[ "${1:-}" == "--pack" ]]; then
    pack=${2:-}
    [[ -n "$pack" ]] || usage
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$ROOT" && "$PYTHON" -m bench.science --size gpu-job --work "$work" --parts fetch,data) || exit 1
    tar -C "$work" -cf "$pack" photos probe data.json || exit 1
    mb=$(( ($(stat -c %s "$pack") + 1048575) / 1048576 ))
    if (( mb > MAX_PACK_MB )); then
        echo "error: $pack is $mb MiB, over the $MAX_PACK_MB MiB that travel with the code; lower crops_train or crop_px of the gpu-job size" >&2
        exit 1
    fi
    echo "packed $pack ($mb MiB)"
    exit 0
fi

[[ $# -ge 1 && "${1:0:1}" != "-" ]] || usage
OUT=$1
shift
DRY=0 DATA="" BUDGET=480
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --data) DATA=${2:-}; shift ;;
        --budget) BUDGET=${2:-}; shift ;;
        *) echo "error: unknown option $1" >&2; usage ;;
    esac
    shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "error: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2; }
if (( ! DRY )) && [[ ! -f "$DATA" ]]; then
    echo "error: --data PACK.tar is required (made by bench/gpu_science.sh --pack PACK.tar), got '${DATA}'" >&2
    exit 2
fi
mkdir -p "$OUT" || { echo "error: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if (( DRY )); then
    demo=$(cd "$ROOT" && "$PYTHON" -c "from pipeline.demo import ensure_demo_shards; print(ensure_demo_shards())") || exit 1
    ln -s "$demo" "$work/photos"
    ln -s "$demo" "$work/probe"  # 8 source photos: enough groups for the ridge's 4 folds
    echo '{"n_train_crops": 64}' > "$work/data.json"
    args=(--size cpu --steps 4 --probe-pairs 0 --seeds 0 --methods vicreg,path,xattn)
else
    tar -xf "$DATA" -C "$work" || { echo "error: cannot unpack $DATA" >&2; exit 2; }
    args=(--size gpu-job)
fi

start=$(date +%s)
(cd "$ROOT" && EQRECON_RESULTS_DIR="$work/results" timeout --signal=TERM --kill-after=10 "$BUDGET" \
    "$PYTHON" -m bench.science "${args[@]}" --work "$work" --parts train,probe,report) > "$OUT/job.log" 2>&1
rc=$?
wall=$(( $(date +%s) - start ))

# Whatever finished is archived, also when the time box cut the job short.
for f in "$work"/results/science-*.json; do [[ -f "$f" ]] && cp "$f" "$OUT/science.json"; done
for f in "$work"/results/science-*-r2.png; do [[ -f "$f" ]] && cp "$f" "$OUT/science-r2.png"; done
[[ -f "$work/summary-partial.json" ]] && cp "$work/summary-partial.json" "$OUT/"
if [[ -d "$work/runs" ]]; then
    tar -C "$work" -czf "$OUT/runs.tar.gz" --exclude=ckpt --exclude=recon --exclude=tensorboard runs
fi
status=$([[ $rc -eq 0 ]] && echo ok || ([[ $rc -eq 124 || $rc -eq 137 ]] && echo timeout || echo failed))
printf '{"status": "%s", "exit_code": %d, "wall_s": %d, "budget_s": %d, "dry_run": %s}\n' \
    "$status" "$rc" "$wall" "$BUDGET" "$([[ $DRY -eq 1 ]] && echo true || echo false)" > "$OUT/status.json"
echo "gpu_science: $status in ${wall}s (budget ${BUDGET}s); results in $OUT"
exit $rc
