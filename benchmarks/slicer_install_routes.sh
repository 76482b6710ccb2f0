#!/bin/bash
# Download size and install time of the 3D Slicer module's two first-use routes, side by side:
#   PyTorch route (a .safetensors/.pt/.pth model): the PyTorch extension's torch (CPU wheel,
#     torch==$TORCH_VERSION) and what pip adds: sam2 (sdist, --no-deps), requirements.txt and
#     requirements-torchfree.txt of SAM2UNetSlicer/Resources;
#   ONNX route (an .onnx model): onnxruntime and requirements-torchfree.txt;
# both plus sam2unet_core itself (--no-deps; the extension carries it). numpy, SimpleITK,
# pydicom and pillow are left out of the sizes and pre-installed in the scratch virtualenvs:
# every Slicer has them, and the module pins them.
# Installs run from the downloaded files (no network), as the module's pip steps do, into a
# fresh virtualenv per run; the script prints wall and pip's CPU time of each run.
#
# Usage: [PYTHON=python] [TORCH_INDEX=URL] benchmarks/slicer_install_routes.sh [SCRATCH_DIR]
#        (default /tmp/slicer_install_routes)
# Needs the network (the package index) and about 3 GB of disk in SCRATCH_DIR.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
RES=$REPO/SAM2UNetSlicer/Resources
PY=${PYTHON:-python}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}  # empty: a local mirror or --find-links has it
RUNS_ONNX=${RUNS_ONNX:-3}
RUNS_TORCH=${RUNS_TORCH:-2}
OUT=${1:-/tmp/slicer_install_routes}
rm -rf "$OUT" && mkdir -p "$OUT" && cd "$OUT"
echo "torch==$TORCH_VERSION+cpu" > torchpin.txt

quiet() { grep -v -E "^WARNING: Location|requires .*which is not installed|dependency resolver does not currently" | tail -2 || true; }
$PY -m pip wheel -q --no-deps --no-build-isolation -w core "$REPO" 2>&1 | quiet
$PY -m pip download -q --dest onnx --only-binary=:all: "onnxruntime>=1.17" -r "$RES/requirements-torchfree.txt" 2>&1 | quiet
# The CPU build of torch from PyTorch's own index (PyPI's Linux wheel is the CUDA build);
# iopath and hydra's antlr4 runtime have no wheels, hence --prefer-binary.
$PY -m pip download -q --dest torch --prefer-binary -c torchpin.txt \
    ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "torch==$TORCH_VERSION+cpu" \
    -r "$RES/requirements.txt" -r "$RES/requirements-torchfree.txt" 2>&1 | quiet
$PY -m pip download -q --dest torch --no-deps "sam2==1.1.0" 2>&1 | quiet

size() { ls "$@" | grep -v -i -E "/(numpy|simpleitk|pydicom|pillow)-" | xargs du -cb | tail -1 | cut -f1; }
MB() { awk -v b="$1" 'BEGIN {printf "%.1f MB", b / 1e6}'; }
ONNX_BYTES=$(size core/* onnx/*)
TORCH_BYTES=$(size core/* torch/*)

BASE=$($PY -c "import sys; print(sys.executable)")
fresh() {  # a virtualenv holding what Slicer already has
  rm -rf "venv_$1" && $BASE -m venv "venv_$1"
  "venv_$1/bin/pip" install -q "numpy<2.5" SimpleITK pydicom pillow "setuptools>=70.1" wheel 2>&1 | quiet
  du -sb "venv_$1"/lib/python3*/site-packages | cut -f1 > "before_$1"
}
timed() { /usr/bin/time -a -o "times_$1" -f "%e %U %S" "${@:2}" 2>&1 | quiet; }
report() {  # wall, CPU (user + system) and disk added by one run
  local added=$(( $(du -sb "venv_$1"/lib/python3*/site-packages | cut -f1) - $(cat "before_$1") ))
  awk -v r="$1" -v a="$added" '{w += $1; c += $2 + $3} END {printf "%-8s install wall %6.1f s  cpu %6.1f s  adds %5.0f MB\n", r, w, c, a / 1e6}' "times_$1"
  rm -rf "venv_$1"
}
for run in $(seq "$RUNS_ONNX"); do
  r=onnx$run; fresh $r; V=venv_$r/bin/python
  timed $r $V -m pip install -q --no-index --no-deps --no-build-isolation core/*.whl
  timed $r $V -m pip install -q --no-index --find-links onnx "onnxruntime>=1.17" -r "$RES/requirements-torchfree.txt"
  report $r
done
for run in $(seq "$RUNS_TORCH"); do
  r=torch$run; fresh $r; V=venv_$r/bin/python
  timed $r $V -m pip install -q --no-index --find-links torch "torch==$TORCH_VERSION+cpu"
  timed $r env SAM2_BUILD_CUDA=0 $V -m pip install -q --no-index --no-deps --no-build-isolation core/*.whl torch/sam2-*.tar.gz
  timed $r $V -m pip install -q --no-index --no-build-isolation --find-links torch -c torchpin.txt \
      -r "$RES/requirements.txt" -r "$RES/requirements-torchfree.txt"
  report $r
done
echo "download  ONNX route $(MB "$ONNX_BYTES")   PyTorch route (CPU torch) $(MB "$TORCH_BYTES")   (numpy, SimpleITK, pydicom, pillow excluded)"
