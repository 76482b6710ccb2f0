#!/usr/bin/env bash
# The whole CUDA check of sam2unet_core in one command, for one call on a GPU machine
# (about 8 minutes on one H100; every step has its own time limit, a failing step does not
# stop the next ones):
#   0. install our dependencies from the wheels carried in .whl/ (benchmarks' wheels.sh,
#      SimpleITK included) into /tmp/site, unless they import already;
#   1. pytest -m cuda (Testing/test_cuda.py): fp16 vs fp32 Dice, bf16 training step and
#      resume, sam2unet-predict --device cuda / auto on a real NIfTI, one-process NCCL torchrun;
#   2. bench_model.py, Hiera-L at 352 px: fp32 eager batch-1 baseline, then fp32/TF32/bf16/fp16
#      (channels_last, SDPA always on), bf16 Hiera stages 3-4 only, torch.compile with CUDA
#      graphs (mode reduce-overhead), batch 64 and 128, each with its Dice against fp32;
#   3. bench_model.py --train: training img/s with the paper's recipe (frozen trunk +
#      adapters, AdamW), fp32 and bf16 channels_last, batch 48;
#   4. bench_volume.py: a 512x512x300 int16 CT .nii.gz through sam2unet-predict, mixed and
#      fp32, per-stage times and peak GPU memory.
# Everything lands in OUT_DIR as <gpu>_<step>.json (gpu: h100, h200 or the nvidia-smi name
# in lower case), <gpu>_suite.json (each step's exit code and seconds) and <gpu>_suite.log
# (all output): at most 6 files, which fits what a device call brings back.
#
# Usage, from the repository root:
#   benchmarks/gpu_suite.sh OUT_DIR                 # on the GPU machine
#   benchmarks/gpu_suite.sh OUT_DIR --cpu-dry-run   # here: the same steps, tiny and on CPU
#
# The device call (README "GPU notes"): carry [".whl"], timeout_s 600, command
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_suite.sh $OUT
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && $2 != --cpu-dry-run ) ]]; then
  echo "usage: $0 OUT_DIR [--cpu-dry-run]" >&2
  exit 2
fi
out=$1
dry_run=$([[ ${2:-} == --cpu-dry-run ]] && echo 1 || echo 0)
mkdir -p "$out" || { echo "error: cannot create the output folder $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if [[ $dry_run == 1 ]]; then
  gpu=cpu-dry-run
else
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  case "$name" in
    *H100*) gpu=h100 ;;
    *H200*) gpu=h200 ;;
    "") echo "error: nvidia-smi found no GPU; use --cpu-dry-run on a machine without one" >&2
        exit 2 ;;
    *) gpu=$(echo "$name" | tr '[:upper:] ' '[:lower:]_' | tr -cd 'a-z0-9_-') ;;
  esac
fi
log=$out/${gpu}_suite.log
: >"$log"
steps_json=""

# run_step NAME SECONDS COMMAND...: runs COMMAND under `timeout`, its output into the log,
# and records its exit code and wall seconds for <gpu>_suite.json.
run_step() {
  local step=$1 limit=$2 started code
  shift 2
  echo "=== $step (limit ${limit}s): $*" | tee -a "$log"
  started=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  code=$?
  local ms=$(( ($(date +%s%N) - started) / 1000000 ))
  local seconds=$((ms / 1000)).$(printf %03d $((ms % 1000)))
  echo "=== $step: exit $code after ${seconds}s" | tee -a "$log"
  steps_json+="${steps_json:+, }\"$step\": {\"exit_code\": $code, \"seconds\": $seconds, \"limit_s\": $limit}"
}

if [[ $dry_run == 0 ]] && ! "$python" -c "import monai, nibabel, sam2, SimpleITK" 2>/dev/null; then
  run_step install 45 "$python" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
fi
export PATH=/tmp/site/bin:$PATH  # console scripts installed with --target
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" \
  2>&1 | tee -a "$log"
nvidia-smi >>"$log" 2>&1 || true

if [[ $dry_run == 1 ]]; then
  device=cpu backbone=hiera_t size=64 batch=4 train_batch=2 shape=(64 64 6) volume_batch=4
  settings=(fp32-b1 fp32 fp32-cl-onednn bf16deep-cl fp32-cl-b8)
  train_settings=(fp32 bf16-cl)
  timing=(--warmup 1 --iters 1 --repeats 1 --threads 1)
  limits=(pytest=300 model=400 train=300 volume=300)  # a shared 2-core machine
else
  device=cuda backbone=hiera_l size=352 batch=64 train_batch=48 shape=(512 512 300) volume_batch=64
  settings=(fp32-b1 fp32 tf32-cl bf16-cl fp16-cl bf16deep-cl fp16-cl-b128 bf16-cl-compile)
  train_settings=(fp32 bf16-cl)
  timing=(--warmup 2 --iters 5 --repeats 3)
  limits=(pytest=130 model=170 train=80 volume=90)  # with install 45: 515 s < timeout_s 600
fi
declare -A limit
for pair in "${limits[@]}"; do limit[${pair%=*}]=${pair#*=}; done

run_step pytest "${limit[pytest]}" "$python" -m pytest -m cuda Testing/test_cuda.py -q -rs \
  -p no:cacheprovider
run_step model "${limit[model]}" "$python" benchmarks/bench_model.py --device "$device" \
  --backbone "$backbone" --size "$size" --batch "$batch" --settings "${settings[@]}" \
  --compile-mode reduce-overhead "${timing[@]}" --json "$out/${gpu}_model.json"
run_step train "${limit[train]}" "$python" benchmarks/bench_model.py --device "$device" \
  --backbone "$backbone" --size "$size" --settings fp32-b1 --train \
  --train-settings "${train_settings[@]}" --train-batch "$train_batch" "${timing[@]}" \
  --json "$out/${gpu}_train.json"
run_step volume "${limit[volume]}" "$python" benchmarks/bench_volume.py --device "$device" \
  --backbone "$backbone" --size "$size" --shape "${shape[@]}" --batch-size "$volume_batch" \
  --precision mixed fp32 --repeats 2 --json "$out/${gpu}_volume.json"

echo "{\"gpu\": \"$gpu\", \"dry_run\": $([[ $dry_run == 1 ]] && echo true || echo false), \
\"date\": \"$(date -u +%FT%TZ)\", \"steps\": {$steps_json}}" >"$out/${gpu}_suite.json"
cat "$out/${gpu}_suite.json"
failed=$("$python" -c "import json,sys; s=json.load(open(sys.argv[1]))['steps'];
print(' '.join(k for k, v in s.items() if v['exit_code']))" "$out/${gpu}_suite.json")
if [[ -n $failed ]]; then
  echo "FAILED steps: $failed (see $log)" >&2
  exit 1
fi
echo "all steps passed; results in $out"
