#!/usr/bin/env bash
# GPU check of the VAE benchmarks: under 10 minutes on one H100/H200 even if every step stalls; about 7.5
# minutes for a full run (sum of the steps measured on an H200).
# Downloads nothing.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]      # logs + JSON + PNG to RESULTS_DIR (default bench/results/gpu)
#   TRAIN_CSV=… VAL_CSV=… bash bench/gpu_check.sh   # real volumes for steps 3-5 (default: ../shared/data/ixi)
#   STEPS="train scaling" bash bench/gpu_check.sh   # only these steps (names below)
#
# Each step runs under its own `timeout` (limits: 580 s in all, + start-up, even if something hangs); the
# most important first, so a cut-short run still has them:
#   1. model_eager          bench_model.py: model-only step, bf16 autocast, channels_last_3d, eager, MFU
#                           (ours, ours + activation checkpointing, MONAI AutoencoderKlMaisi, AutoencoderKL).
#                           If this fails the environment is broken: the script stops here.
#   2. train_step_eager     bench_train_step.py: full GAN step (VAE + LPIPS3D + PatchGAN, AdamW), MFU
#   3. train                train.py, default config, 4 epochs incl. 2 in the GAN stage   (needs both CSVs)
#   4. encode               bench_encode.py: save_latent.py throughput, I/O included      (needs TRAIN_CSV)
#   5. data_loader          bench_data.py: loader throughput per cache mode / workers     (needs TRAIN_CSV)
#   6. model_compile        as 1 with torch.compile (ours, AutoencoderKL; compile time is in the warm-up)
#   7. scaling              bench_scaling.py: step time / peak memory vs volume and batch size + plot
#   8. model_ncdhw          as 1 without channels_last_3d (memory-format check)
# then prints one summary table. MFU uses PEAK_TFLOPS (default 989 = H100/H200 SXM dense bf16).
set -uo pipefail

cd "$(dirname "$0")/.."
RESULTS="${1:-bench/results/gpu}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
PYTHON="${PYTHON:-python3}"
IXI=../shared/data/ixi
TRAIN_CSV="${TRAIN_CSV:-$([ -f $IXI/train.csv ] && echo $IXI/train.csv)}"
VAL_CSV="${VAL_CSV:-$([ -f $IXI/val.csv ] && echo $IXI/val.csv)}"
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

"$PYTHON" - <<'EOF' || { echo "CUDA not available: nothing run"; exit 1; }
import torch
assert torch.cuda.is_available()
print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| cuda", torch.version.cuda)
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv \
    > "$RESULTS/nvidia_smi.csv" 2>&1 || true
nproc > "$RESULTS/cpu_cores.txt"

# run NAME LIMIT_S CMD...: run under `timeout`, log to $RESULTS/NAME.log, record exit code and wall time
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc wall=$((SECONDS - start))s" | tee -a "$RESULTS/status.txt"
    tail -n 12 "$RESULTS/$name.log"
    return $rc
}

COMMON=(--device cuda --peak-tflops "$PEAK_TFLOPS")
VARIANTS=(ours ours_ckpt maisi monai_kl)
# wanted NAME: true when STEPS is unset or names NAME
wanted() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }

if wanted model_eager; then
    run model_eager 60 "$PYTHON" bench/bench_model.py "${COMMON[@]}" --steps 10 --variants "${VARIANTS[@]}" \
        --json "$RESULTS/model_eager.json" || { echo "model step failed: environment broken, stopping"; exit 1; }
fi
wanted train_step_eager && run train_step_eager 75 "$PYTHON" bench/bench_train_step.py "${COMMON[@]}" \
    --steps 10 --variants "${VARIANTS[@]}" --json "$RESULTS/train_step_eager.json"
if [ -n "$TRAIN_CSV" ] && [ -n "$VAL_CSV" ] && wanted train; then
    run train 75 "$PYTHON" train.py --config_file config.json --set train.run_name='"gpu_check"' \
        --set data.train_csv="\"$TRAIN_CSV\"" --set data.val_csv="\"$VAL_CSV\"" --set data.num_workers=8 \
        --set train.num_epochs=4 --set train.gan_start_epoch=2 --set train.val_every=2 \
        --set train.runs_dir="\"$RESULTS/runs\"" --set train.best_runs_dir="\"$RESULTS/best_runs\""
fi
if [ -n "$TRAIN_CSV" ]; then
    wanted encode && run encode 45 "$PYTHON" bench/bench_encode.py --csv "$TRAIN_CSV" --rows 16 \
        --batch_sizes 1 4 --num_workers 0 8 --device cuda
    wanted data_loader && run data_loader 45 "$PYTHON" bench/bench_data.py --split "$TRAIN_CSV" --limit 16 \
        --augment --workers 0 8
fi
wanted model_compile && run model_compile 120 "$PYTHON" bench/bench_model.py "${COMMON[@]}" --steps 10 \
    --variants ours monai_kl --compile --json "$RESULTS/model_compile.json"
wanted scaling && run scaling 110 "$PYTHON" bench/bench_scaling.py --device cuda --steps 5 --budget-s 95 \
    --json "$RESULTS/scaling_cuda.json" --plot "$RESULTS/scaling_cuda.png"
wanted model_ncdhw && run model_ncdhw 50 "$PYTHON" bench/bench_model.py "${COMMON[@]}" --steps 10 \
    --variants ours maisi monai_kl --no-channels-last --json "$RESULTS/model_ncdhw.json"

echo
echo "== summary ($RESULTS)"
"$PYTHON" - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"{'run':18s} {'variant':10s} {'s/step':>8s} {'peak MiB':>9s} {'MFU':>7s}")
for name in ("model_eager", "train_step_eager", "model_ncdhw", "model_compile"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name:18s} (no result: see {name}.log)")
        continue
    for variant, r in json.loads(path.read_text())["results"].items():
        mfu = f"{100 * r['mfu']:6.2f}%" if "mfu" in r else "      -"
        print(f"{name:18s} {variant:10s} {r['s_per_step']:8.4f} {r['peak_mib']:9.0f} {mfu}")
path = out / "scaling_cuda.json"
if path.exists():
    for r in json.loads(path.read_text())["records"]:
        shape = "x".join(map(str, r["shape"]))
        value = f"{r['s_per_step']:.4f} s {r['peak_mib']:.0f} MiB" if r["status"] == "ok" else r["status"]
        print(f"{'scaling':18s} {r['model']:10s} {shape} x{r['batch']}: {value}")
for csv in sorted(out.glob("runs/*/metrics.csv")):
    print(f"train metrics: {csv}")
    print(csv.read_text())
EOF
cat "$RESULTS/status.txt"
