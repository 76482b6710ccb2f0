"""Slicer's own Python never imports torch, MONAI or sam2: a fresh interpreter drives
SAM2UNetSlicer.py (on the Qt fakes of slicer_module_fakes) through choosing a .safetensors and a
.pth checkpoint, starting a run and importing its labels, then lists the heavy modules loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import slicer_fakes  # noqa: F401 - puts SAM2UNetSlicer/ on sys.path

from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

TESTING = Path(__file__).resolve().parent
REPO = TESTING.parent
HEAVY = ("torch", "monai", "sam2", "torchvision")

FLOW = r'''
import json, sys, time
from pathlib import Path
sys.path.insert(0, TESTING)
import numpy as np
import pytest

import slicer_fakes  # noqa: F401 - puts SAM2UNetSlicer/ on sys.path
import SimpleITK as sitk
from slicer_fakes import FakeRunner, obliqueIjkToRas
from slicer_module_fakes import installFakeSlicerModules

monkeypatch = pytest.MonkeyPatch()
fake = installFakeSlicerModules(monkeypatch)
import importlib
module = importlib.import_module("SAM2UNetSlicer")
runners = []
module.SubprocessRunner = lambda cwd=None: runners.append(FakeRunner()) or runners[-1]
module.WarmPredictRunner = lambda: runners[0]  # the warm worker is the logic's runner here
module.findPythonSlicer = lambda: sys.executable
import SAM2UNetSlicerLib.SegmentationLogic as segmentationLogic
segmentationLogic.findPythonSlicer = lambda: sys.executable
widget = module.SAM2UNetSlicerWidget()
widget.setup()
logicRunner, trainingRunner, probeRunner, describeRunner = runners  # the logic builds the first two
parameters = widget._parameterNode
parameters.inputVolume = fake.mrmlScene.addVolume("CT", np.zeros((4, 8, 10), np.int16), obliqueIjkToRas())

started = time.perf_counter()
parameters.checkpointPath = Path(PTH)  # the official format: described by a child process
pthSeconds = time.perf_counter() - started
describeRunner.emit(METADATA_JSON)
describeRunner.finish(0)
widget._poll()
pthInfo = widget.ui.modelInfoLabel.text

parameters.checkpointPath = Path(SAFETENSORS)  # ours: read from the header
widget.ui.segmentButton.emit("clicked(bool)", False)
inputPath = Path(logicRunner.argument("-i"))
outputPath = Path(logicRunner.argument("-o")) / "input.nii.gz"
outputPath.parent.mkdir()
labels = sitk.GetImageFromArray(np.ones((4, 8, 10), np.uint8))
labels.CopyInformation(sitk.ReadImage(str(inputPath)))
sitk.WriteImage(labels, str(outputPath))
logicRunner.emit(json.dumps({"event": "case_done", "case": "input", "output": str(outputPath), "seconds": 1}))
logicRunner.finish(0)
widget._poll()
segments = [s.name for s in parameters.outputSegmentation.GetSegmentation().segments.values()]
heavy = sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)
print(json.dumps({"pthSeconds": pthSeconds, "pthInfo": pthInfo, "status": widget.ui.statusLabel.text,
                  "segments": segments, "heavy": heavy}))
'''


def _pythonEnvironment() -> dict[str, str]:
    return {"PYTHONPATH": f"{REPO}:{REPO / 'SAM2UNetSlicer'}", "PATH": "/usr/bin:/bin"}


def _importsTorch(statement: str) -> bool:
    code = f"import sys; {statement}; print(any(n.split('.')[0] == 'torch' for n in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_pythonEnvironment(),
                            cwd=REPO, timeout=300, check=True)
    return result.stdout.strip().endswith("True")


@pytest.mark.slow
def test_choosing_a_checkpoint_running_and_importing_never_imports_torch(tmp_path: Path) -> None:
    if _importsTorch("import sam2unet_core.metadata"):
        pytest.skip("importing any sam2unet_core module still imports torch here: the package's lazy "
                    "import (issue 11) is not merged into this branch")
    metadata = ModelMetadata(architecture=Architecture(backbone="hiera_t", num_classes=3),
                             labels=default_labels(3, ["liver", "spleen"]), input_size=64)
    safetensors = save_model(SAM2UNet(backbone="hiera_t", num_classes=3), tmp_path / "organs.safetensors", metadata)
    pth = tmp_path / "SAM2-UNet-official.pth"
    with open(pth, "wb") as handle:
        handle.truncate(900 * 1024 * 1024)  # the size of an official checkpoint (sparse)
    script = FLOW.replace("TESTING", repr(str(TESTING))).replace("PTH", repr(str(pth)))
    script = script.replace("SAFETENSORS", repr(str(safetensors))).replace("METADATA_JSON", repr(metadata.to_json()))
    script = script.replace("HEAVY", repr(HEAVY))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env=_pythonEnvironment(), timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["segments"] == ["liver", "spleen"] and report["status"] == "2 segment(s) in CT segmentation"
    assert "liver, spleen" in report["pthInfo"]
    assert report["pthSeconds"] < 0.1
    assert report["heavy"] == [], f"Slicer's process imported {report['heavy']}"


def test_describe_cli_reads_an_official_pth_in_the_child(official_sam2unet_checkpoint: Path, tmp_path: Path) -> None:
    """What the panel runs for a .pth: one JSON line that parseDescribeOutput turns into metadata."""
    from SAM2UNetSlicerLib.ModelInfo import describeCommand, parseDescribeOutput

    result = subprocess.run(describeCommand(sys.executable, official_sam2unet_checkpoint), capture_output=True,
                            text=True, cwd=REPO, env=_pythonEnvironment(), timeout=300)
    metadata = parseDescribeOutput(result.stdout.splitlines(), official_sam2unet_checkpoint, result.returncode)
    assert metadata.architecture.backbone == "hiera_t" and metadata.architecture.num_classes == 1

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 truncated")
    result = subprocess.run(describeCommand(sys.executable, broken), capture_output=True, text=True, cwd=REPO,
                            env=_pythonEnvironment(), timeout=300)
    assert result.returncode == 1
    with pytest.raises(ValueError, match=r"cannot read the model metadata of .*broken\.pth: error: .*broken\.pth"):
        parseDescribeOutput((result.stdout + result.stderr).splitlines(), broken, result.returncode)


def test_safetensors_header_is_read_without_torch_like_the_checkpoint_reader(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from sam2unet_core.checkpoint import read_metadata
    from sam2unet_core.metadata import read_safetensors_metadata

    assert read_safetensors_metadata(tiny_checkpoint) == read_metadata(tiny_checkpoint)
    not_safetensors = tmp_path / "x.safetensors"
    not_safetensors.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(ValueError, match=r"x\.safetensors: not a readable safetensors file \(bad JSON header"):
        read_safetensors_metadata(not_safetensors)
    foreign = tmp_path / "foreign.safetensors"
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    foreign.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match=r"foreign\.safetensors: safetensors file without 'sam2unet' metadata"):
        read_safetensors_metadata(foreign)


# ------------------------------------------------------------------------------ ONNX route
# A Slicer with only what the ONNX route installs: this sitecustomize makes torch,
# torchvision, monai, sam2 and the other PyTorch-route packages unimportable in the Slicer
# process AND in every child it starts (describe, device probe, sam2unet-predict), so the run
# below can only succeed on the ONNX route and its requirements.
NO_TORCH_SITECUSTOMIZE = r'''
import importlib.abc
import sys

BLOCKED = {"torch", "torchvision", "monai", "sam2", "hydra", "iopath", "safetensors", "highdicom", "yaml", "scipy"}


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (a Slicer without PyTorch)", name=name)
        return None


sys.meta_path.insert(0, _NoTorch())
'''

ONNX_FLOW = r'''
import json, sys, time
from pathlib import Path
sys.path.insert(0, TESTING)
import numpy as np
import pytest

import slicer_fakes  # noqa: F401 - puts SAM2UNetSlicer/ on sys.path
from slicer_fakes import obliqueIjkToRas
from slicer_module_fakes import installFakeSlicerModules

try:
    import torch  # noqa: F401
    raise SystemExit("torch is importable: the blocker did not load")
except ModuleNotFoundError:
    pass
monkeypatch = pytest.MonkeyPatch()
fake = installFakeSlicerModules(monkeypatch)
import importlib
module = importlib.import_module("SAM2UNetSlicer")  # real SubprocessRunners: real child processes
module.findPythonSlicer = lambda: sys.executable
import SAM2UNetSlicerLib.SegmentationLogic as segmentationLogic
segmentationLogic.findPythonSlicer = lambda: sys.executable
widget = module.SAM2UNetSlicerWidget()
widget.setup()
parameters = widget._parameterNode
rng = np.random.default_rng(0)
parameters.inputVolume = fake.mrmlScene.addVolume("CT", rng.normal(0, 300, (5, 24, 20)).astype(np.int16),
                                                  obliqueIjkToRas())


def waitFor(condition, seconds=300.0):
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise SystemExit(f"timed out: {widget.ui.statusLabel.text} | {widget.ui.modelInfoLabel.text}")
        widget._poll()
        time.sleep(0.05)


parameters.checkpointPath = Path(ONNX)
waitFor(lambda: widget.ui.modelInfoLabel.text != "Reading the model details...")
waitFor(lambda: widget._deviceReport is not None and widget._deviceReport.runtime == "onnx"
        and not widget._probeRunner.isRunning())
parameters.device = module.Device.cpu
widget.ui.segmentButton.emit("clicked(bool)", False)
waitFor(lambda: not widget.logic.segmentation.isRunning())
output = parameters.outputSegmentation
segments = [s.name for s in output.GetSegmentation().segments.values()] if output else []
heavy = sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)
print(json.dumps({"info": widget.ui.modelInfoLabel.text, "devices": widget.ui.deviceInfoLabel.text,
                  "status": widget.ui.statusLabel.text, "segments": segments, "heavy": heavy,
                  "dialogs": fake.dialogs, "log": widget.ui.logTextEdit.lines}))
'''


@pytest.fixture(scope="module")
def onnxModel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sam2unet_core.export.onnx import export_onnx

    metadata = ModelMetadata(architecture=Architecture(backbone="hiera_t", num_classes=3),
                             labels=default_labels(3, ["liver", "spleen"]), input_size=64)
    model = SAM2UNet(backbone="hiera_t", num_classes=3)
    model.metadata = metadata
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "organs.onnx")


@pytest.mark.slow
def test_onnx_model_segments_in_a_slicer_without_pytorch(onnxModel: Path, tmp_path: Path) -> None:
    """Choose an .onnx model, probe devices, press Segment: the real describe, probe and
    sam2unet-predict children run where torch, MONAI and sam2 cannot be imported."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH_SITECUSTOMIZE, encoding="utf-8")
    env = dict(_pythonEnvironment(), PYTHONPATH=f"{blocker}:{_pythonEnvironment()['PYTHONPATH']}", OMP_NUM_THREADS="2")
    script = ONNX_FLOW.replace("TESTING", repr(str(TESTING))).replace("ONNX", repr(str(onnxModel)))
    script = script.replace("HEAVY", repr(HEAVY))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["dialogs"] == [], report["log"]
    assert "liver, spleen" in report["info"], report["info"]
    assert report["devices"].startswith("Found: onnxruntime ") and report["devices"].endswith("CPU")
    assert report["segments"] == ["liver", "spleen"], report["log"]
    assert report["status"] == "2 segment(s) in CT segmentation"
    assert '{"event": "done", "ok": 1, "failed": 0, "skipped": 0}' in report["log"]  # sam2unet-predict's own report
    assert report["heavy"] == [], f"Slicer's process imported {report['heavy']}"
