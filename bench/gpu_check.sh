#!/usr/bin/env bash
# GPU check of training speed (issue "Train at GPU speed"): ONE run on one H100/H200 of at most TOTAL_S seconds
# (default 540 = 9 min; the deadline counts from the start, a few seconds more for the summary) writes
# RESULTS/train_throughput.json (rewritten after every step, so a run cut short keeps what it measured) and
# RESULTS/profile.json. Downloads nothing.
#
#   GIT_COMMIT=<hash> bash bench/gpu_check.sh [RESULTS]    # default /tmp/gpu_check_<date>; must be new
#   DRY_RUN=1 bash bench/gpu_check.sh                      # every step, tiny, on the CPU (tests the script)
#   STEPS="throughput profile" bash bench/gpu_check.sh     # only these steps (env always runs)
#   ARCHIVE=$OUT/gpu_check.tar.gz bash bench/gpu_check.sh  # also pack RESULTS (no checkpoints) after each step
#
# Steps in priority order (env, throughput, model, time_to_quality, profile: what each runs and its estimated
# H200 time are in bench/README.md), each under `timeout` with the smaller of its own limit and what the
# deadline leaves (time_to_quality's minimum is kept free for it while earlier steps run); a step whose minimum
# no longer fits is skipped and says so in status.txt and the JSON's notes. With the default TOTAL_S the
# compiled half of `model` or `profile` may be cut; TOTAL_S=600 leaves room for all. PYTHON (python3),
# PEAK_TFLOPS (989), BASELINE_WORKERS (8), TTQ_SECONDS (180) can be set.
set -uo pipefail

cd "$(dirname "$0")/.."
DRY_RUN="${DRY_RUN:-0}"
RESULTS="${1:-/tmp/gpu_check_$(date +%Y%m%d_%H%M%S)}"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
GPU_DATA="${GPU_DATA:-.gpu_data}"
SITE="${SITE:-/tmp/site}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
if [ "$DRY_RUN" = 1 ]; then
    TOTAL_S="${TOTAL_S:-900}" TTQ_SECONDS="${TTQ_SECONDS:-10}" BASELINE_WORKERS="${BASELINE_WORKERS:-0}"
    DEVICE=cpu CONFIG=configs/cpu.json DRY=(--dry_run)
    case "$(realpath -m "$RESULTS")" in "$(realpath -m bench/results)"*)
        echo "DRY_RUN results never go under bench/results: give a folder under /tmp"; exit 2 ;;
    esac
else
    TOTAL_S="${TOTAL_S:-540}" TTQ_SECONDS="${TTQ_SECONDS:-180}" BASELINE_WORKERS="${BASELINE_WORKERS:-8}"
    DEVICE=cuda CONFIG=config.json DRY=()
fi
if [ -e "$RESULTS/status.txt" ]; then
    echo "$RESULTS already holds a run (status.txt): give a new folder"
    exit 2
fi
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + TOTAL_S))
RESERVE=10                           # seconds kept for the last assembly and the summary
TTQ_MIN=$((2 * TTQ_SECONDS + 40))    # time_to_quality: two runs + start-up, validation, evaluation
SKIPPED=99                           # run's exit code for a step the deadline left no room for

# assemble: rewrite train_throughput.json from what RESULTS holds; pack RESULTS into ARCHIVE when set
assemble() {
    "$PYTHON" -m bench.train_throughput --results "$RESULTS" "${DRY[@]}" >> "$RESULTS/assemble.log" 2>&1
    if [ -n "${ARCHIVE:-}" ]; then
        tar czf "$ARCHIVE" --exclude='*.pt' -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
    fi
}

# run NAME WANT MIN KEEP CMD...: CMD under `timeout` for at most WANT s, less when the deadline (minus KEEP s
# kept for a later step) is nearer; skipped when under MIN s are left. Logs to RESULTS/NAME.log.
run() {
    local name=$1 want=$2 min=$3 keep=$4
    shift 4
    local left=$((DEADLINE - SECONDS - RESERVE - keep))
    local limit=$((want < left ? want : left))
    if [ "$limit" -lt "$min" ]; then
        echo "$name skipped: ${left}s left before the deadline, needs ${min}s" | tee -a "$RESULTS/status.txt"
        return $SKIPPED
    fi
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc wall=$((SECONDS - start))s limit=${limit}s" | tee -a "$RESULTS/status.txt"
    tail -n 12 "$RESULTS/$name.log"
    assemble
    return $rc
}

# wanted NAME: true when STEPS is unset or names NAME
wanted() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }

# broken WHY: the environment cannot run the checks; record it and stop
broken() {
    echo "env broken: $1" | tee -a "$RESULTS/status.txt"
    assemble
    exit 1
}

# ---- env
echo "== env (results: $RESULTS, deadline ${TOTAL_S}s, dry run: $DRY_RUN)"
env_start=$SECONDS
if ! "$PYTHON" -c "import monai, nibabel, importlib.util as u; assert u.find_spec('deepbet')" 2> /dev/null; then
    ls "$WHEELS"/*.whl > /dev/null 2>&1 ||
        broken "MONAI, nibabel or deepbet missing and no wheels in $WHEELS (python -m bench.gpu_prepare pack)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || broken "pip install of $WHEELS/*.whl failed"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -z "${TRAIN_CSV:-}" ]; then
    if [ -f "$GPU_DATA/ixi/train.csv" ]; then
        "$PYTHON" -m bench.gpu_prepare unpack --data "$GPU_DATA" --to /tmp/gpu_data ||
            broken "unpacking $GPU_DATA failed"
        TRAIN_CSV=/tmp/gpu_data/ixi/train.csv VAL_CSV=/tmp/gpu_data/ixi/val.csv
    elif [ -f ../shared/data/ixi/train.csv ]; then
        TRAIN_CSV=../shared/data/ixi/train.csv VAL_CSV=../shared/data/ixi/val.csv
    else
        broken "no IXI data: set TRAIN_CSV and VAL_CSV, or carry .gpu_data (python -m bench.gpu_prepare pack)"
    fi
fi
"$PYTHON" -m bench.gpu_prepare check --results "$RESULTS" --train_csv "$TRAIN_CSV" --val_csv "$VAL_CSV" \
    "${DRY[@]}" > "$RESULTS/env.log" 2>&1 || { tail -n 20 "$RESULTS/env.log"; broken "see env.log"; }
# shellcheck source=/dev/null
source "$RESULTS/env.sh" # DEEPBET_MODEL, VAL_HEAD_CSV (and in a dry run TRAIN_CSV / VAL_CSV cut short)
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv \
        > "$RESULTS/nvidia_smi.csv" 2>&1
fi
echo "env rc=0 wall=$((SECONDS - env_start))s" | tee -a "$RESULTS/status.txt"
cat "$RESULTS/env.log"
WEIGHTS=(--set "perceptual.weights_path=\"$DEEPBET_MODEL\"")

# ---- the steps
if [ "$DRY_RUN" = 1 ]; then
    TINY_TRAIN=(--set train.max_steps_per_epoch=2)
    TINY_MODEL=(--shape 32 32 32 --steps 1 --measure time)
    TINY_PROFILE=(--shape 32 32 32 --steps 1 --warmup 1 --data_limit 3 --set train.log_every_steps=2)
    PROFILE_LIMIT=300 # a shared 2-core CPU: the GAN-stage steps under the counting modes take seconds each
else
    TINY_TRAIN=() TINY_MODEL=(--steps 10) TINY_PROFILE=(--steps 5 --warmup 3 --data_limit 8) PROFILE_LIMIT=75
fi
if wanted throughput; then
    run throughput 120 40 "$TTQ_MIN" "$PYTHON" -m bench.train_throughput --results "$RESULTS" --train \
        --config "$CONFIG" --train_csv "$TRAIN_CSV" --val_csv "$VAL_HEAD_CSV" --epochs 4 --gan_start_epoch 2 \
        "${WEIGHTS[@]}" "${TINY_TRAIN[@]}" "${DRY[@]}"
    rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne $SKIPPED ]; then
        echo "the first training run failed: environment broken, stopping"
        exit 1
    fi
fi
wanted model && run model 150 30 "$TTQ_MIN" "$PYTHON" -m bench.model_step --device "$DEVICE" \
    --variants ours monai_kl --peak_tflops "$PEAK_TFLOPS" --json "$RESULTS/model_eager.json" \
    --compiled_json "$RESULTS/model_compile.json" "${TINY_MODEL[@]}"
wanted time_to_quality && run time_to_quality $((2 * TTQ_SECONDS + 90)) "$TTQ_MIN" 0 "$PYTHON" \
    -m bench.quality --seconds "$TTQ_SECONDS" --config "$CONFIG" --train_csv "$TRAIN_CSV" \
    --val_csv "$VAL_CSV" --device "$DEVICE" --baseline_workers "$BASELINE_WORKERS" \
    --out "$RESULTS/time_to_quality" --json "$RESULTS/time_to_quality.json" "${WEIGHTS[@]}"
wanted profile && run profile "$PROFILE_LIMIT" 25 0 "$PYTHON" -m bench.profile_step --device "$DEVICE" --config "$CONFIG" \
    --data both --set "data.train_csv=\"$TRAIN_CSV\"" --set "data.val_csv=\"$VAL_CSV\"" \
    --set data.demo_dir=null --json "$RESULTS/profile.json" "${WEIGHTS[@]}" "${TINY_PROFILE[@]}"

# ---- summary
echo
echo "== summary ($RESULTS, $((SECONDS - DEADLINE + TOTAL_S)) s in all)"
assemble
"$PYTHON" - "$RESULTS" << 'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
result = json.loads((out / "train_throughput.json").read_text())
for key, value in result.items():
    if key not in ("settings", "notes"):
        print(f"{key:45s} {json.dumps(value)}")
for note in result["notes"]:
    print(f"note: {note}")
path = out / "profile.json"
if path.exists():
    for stage, values in json.loads(path.read_text())["stages"].items():
        text = values["breakdown"]
        print(f"profile {stage}: {values['wall_ms_per_step']:.1f} ms/step wall; shares of {text['basis']}:")
        for name, item in text["categories"].items():
            print(f"  {name:48s} {item['ms_per_step']:8.2f} ms {100 * item['share']:5.1f} %")
        print(f"  syncs per step in train_step: {values['syncs_per_step_in_train_step'] or 'none'}")
EOF
cat "$RESULTS/status.txt"
