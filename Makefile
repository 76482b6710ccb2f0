# Two commands on a fresh machine:  make test   and   make demo
# Each creates the local virtualenv .venv on first use (about 2 minutes with a warm pip cache).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo clean dicom3tools

venv: $(STAMP)

$(STAMP): requirements.txt requirements-torch.txt requirements-onnx.txt requirements-dev.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION)
	# sam2 is an sdist that declares torchvision (not needed, and absent here): no deps,
	# no CUDA extension, built against the torch above.
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-deps --no-build-isolation sam2==1.1.0
	# the torch-free core, the torch route (training, export, MONAI), ONNX Runtime, tests
	$(PIP) install -q -r requirements.txt -r requirements-torch.txt -r requirements-onnx.txt \
	  -r requirements-dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

SLICER_STAMP := $(VENV)/.slicer-installed

# Slicer's Qt-free core for the real-Slicer test tier (pinned, see requirements-slicer.txt).
$(SLICER_STAMP): $(STAMP) requirements-slicer.txt
	$(PIP) install -q -r requirements-slicer.txt
	touch $(SLICER_STAMP)

# dciodvfy (Debian package dicom3tools) checks the DICOM SEG files we write; installed only
# when missing, with apt-get (as root, or through sudo).
dicom3tools:
	@command -v dciodvfy >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends dicom3tools; }

test: venv $(SLICER_STAMP) dicom3tools
	$(PY) -m pytest Testing

# make demo SAM2=/path/to/sam2.1_hiera_tiny.pt: train on the frozen SAM 2 trunk (the paper's recipe)
demo: venv
	$(PY) training/demo.py $(if $(SAM2),--sam2 "$(SAM2)")

clean:
	rm -rf $(VENV) demo_output build *.egg-info
