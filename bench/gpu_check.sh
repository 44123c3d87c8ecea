#!/usr/bin/env bash
# GPU check of the VAE benchmarks, < 8 minutes in all on one H100/H200. Downloads nothing.
#
#   bash bench/gpu_check.sh            # logs + JSON to ${OUT:-bench/results/gpu}
#
# Runs (each under its own `timeout`: 455 s at most in all, + start-up, even if something hangs):
#   1. bench_model.py       model-only step, bf16 autocast, channels_last_3d, eager          (MFU)
#   2. bench_model.py       same, NCDHW (--no-channels-last)                                 (memory-format check)
#   3. bench_model.py       same as 1 with torch.compile                                     (MFU)
#   4. bench_train_step.py  full GAN step (VAE + LPIPS3D + PatchGAN, AdamW), eager           (MFU)
#   5. bench_train_step.py  same with torch.compile of the VAE                               (MFU)
#   6. bench_scaling.py     step time / peak memory vs volume and batch size (time-boxed), + scaling_cuda.png
# then prints one summary table (s/step, peak MiB, MFU per run and variant).
# MFU uses --peak-tflops (default 989 = H100/H200 SXM dense bf16); pass PEAK_TFLOPS=... for other cards.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

"$PYTHON" - <<'EOF' || { echo "CUDA not available: nothing run"; exit 1; }
import torch
assert torch.cuda.is_available()
print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| cuda", torch.version.cuda)
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true

# run NAME LIMIT_S CMD...: run under `timeout`, log to $OUT/NAME.log, record the exit code
run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc wall=$((SECONDS - start))s" | tee -a "$OUT/status.txt"
    tail -n 8 "$OUT/$name.log"
}

VARIANTS=(ours ours_ckpt maisi monai_kl)
COMPILE_VARIANTS=(ours maisi monai_kl) # compile time dominates: no ours_ckpt
COMMON=(--device cuda --steps 5 --peak-tflops "$PEAK_TFLOPS")

run model_eager 50 "$PYTHON" bench/bench_model.py "${COMMON[@]}" --variants "${VARIANTS[@]}" \
    --json "$OUT/model_eager.json"
run model_ncdhw 35 "$PYTHON" bench/bench_model.py "${COMMON[@]}" --variants "${COMPILE_VARIANTS[@]}" \
    --no-channels-last --json "$OUT/model_ncdhw.json"
run model_compile 130 "$PYTHON" bench/bench_model.py "${COMMON[@]}" --variants "${COMPILE_VARIANTS[@]}" \
    --compile --json "$OUT/model_compile.json"
run train_step_eager 50 "$PYTHON" bench/bench_train_step.py "${COMMON[@]}" --variants "${VARIANTS[@]}" \
    --json "$OUT/train_step_eager.json"
run train_step_compile 130 "$PYTHON" bench/bench_train_step.py "${COMMON[@]}" \
    --variants "${COMPILE_VARIANTS[@]}" --compile --json "$OUT/train_step_compile.json"
run scaling 60 "$PYTHON" bench/bench_scaling.py --device cuda --steps 3 --timeout-s 30 --budget-s 45 \
    --json "$OUT/scaling_cuda.json" --plot "$OUT/scaling_cuda.png"

echo
echo "== summary ($OUT)"
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"{'run':20s} {'variant':12s} {'s/step':>8s} {'peak MiB':>9s} {'MFU':>7s}")
for name in ("model_eager", "model_ncdhw", "model_compile", "train_step_eager", "train_step_compile"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name:20s} (no result: see {name}.log)")
        continue
    for variant, r in json.loads(path.read_text())["results"].items():
        mfu = f"{100 * r['mfu']:6.2f}%" if "mfu" in r else "      -"
        print(f"{name:20s} {variant:12s} {r['s_per_step']:8.4f} {r['peak_mib']:9.0f} {mfu}")
path = out / "scaling_cuda.json"
if path.exists():
    for r in json.loads(path.read_text())["records"]:
        shape = "x".join(map(str, r["shape"]))
        value = f"{r['s_per_step']:.4f} s {r['peak_mib']:.0f} MiB" if r["status"] == "ok" else r["status"]
        print(f"{'scaling':20s} {r['model']:12s} {shape} x{r['batch']}: {value}")
EOF
cat "$OUT/status.txt"
