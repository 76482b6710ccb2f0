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
module.findPythonSlicer = lambda: sys.executable
import SAM2UNetSlicerLib.SegmentationLogic as segmentationLogic
segmentationLogic.findPythonSlicer = lambda: sys.executable
widget = module.SAM2UNetSlicerWidget()
widget.setup()
logicRunner, probeRunner, describeRunner = runners
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
