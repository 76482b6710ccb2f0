"""SAM2UNetSlicer.py itself (Widget and Logic) on fake slicer/qt/vtk modules: when Segment is
enabled, a run and a cancel through the buttons, the first-use installation decisions."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_fakes import FakeRunner, obliqueIjkToRas
from slicer_module_fakes import installFakeSlicerModules

from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

SHAPE_KJI = (6, 16, 20)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    metadata = ModelMetadata(architecture=Architecture(backbone="hiera_t", num_classes=3),
                             labels=default_labels(3, ["liver", "spleen"]), input_size=64)
    path = tmp_path_factory.mktemp("widget") / "organs.safetensors"
    save_model(SAM2UNet(backbone="hiera_t", num_classes=3), path, metadata)
    return path


class Panel:
    """The module widget set up on the fakes, with FakeRunners for every process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, confirm: bool = True, beforeSetup=None) -> None:
        self.slicer = installFakeSlicerModules(monkeypatch, confirm=confirm)
        self.module = importlib.import_module("SAM2UNetSlicer")
        if beforeSetup is not None:
            beforeSetup(self.module)
        self.runners: list[FakeRunner] = []

        def newRunner(cwd=None) -> FakeRunner:
            self.runners.append(FakeRunner())
            return self.runners[-1]

        monkeypatch.setattr(self.module, "SubprocessRunner", newRunner)
        # the warm worker is the logic's runner here, so one FakeRunner gets every command
        monkeypatch.setattr(self.module, "WarmPredictRunner", lambda: self.runners[0])
        monkeypatch.setattr(self.module, "findPythonSlicer", lambda: sys.executable)
        monkeypatch.setattr("SAM2UNetSlicerLib.SegmentationLogic.findPythonSlicer", lambda: sys.executable)
        self.widget = self.module.SAM2UNetSlicerWidget()
        self.widget.setup()
        self.ui = self.widget.ui
        self.logicRunner, self.trainRunner, self.probeRunner, self.describeRunner = self.runners

    @property
    def parameters(self):
        return self.widget._parameterNode

    def addVolume(self, name: str = "CT"):
        return self.slicer.mrmlScene.addVolume(name, np.zeros(SHAPE_KJI, np.int16), obliqueIjkToRas())

    def answerProbe(self, cuda: list[str]) -> None:
        self.probeRunner.emit(json.dumps({"probe": "sam2unet-device-probe", "torch": "2.5.1", "cuda": cuda,
                                          "mps": False, "error": ""}))
        self.probeRunner.finish(0)
        self.widget._poll()

    def nodeNames(self) -> list[str]:
        return [node.GetName() for node in self.slicer.mrmlScene.nodes]

    def closeMidRun(self) -> None:
        """Close the module while a run goes on, as quitting Slicer does: the run is cancelled
        and its temporary folder (the exported input) removed."""
        tempDir = self.widget.logic.segmentation._run.tempDir
        assert tempDir.is_dir()
        self.widget.cleanup()
        assert not self.logicRunner.isRunning() and not tempDir.exists()


@pytest.fixture
def panel(monkeypatch: pytest.MonkeyPatch) -> Panel:
    return Panel(monkeypatch)


def test_segment_is_enabled_only_when_it_can_run(panel: Panel, checkpoint: Path) -> None:
    assert panel.probeRunner.args[-1].endswith("DeviceProbe.py")
    assert not panel.ui.segmentButton.enabled
    assert "select an input volume" in panel.ui.segmentButton.toolTip
    assert panel.ui.modelInfoLabel.text == "No model chosen"

    panel.parameters.inputVolume = panel.addVolume()
    assert not panel.ui.segmentButton.enabled
    assert panel.ui.segmentButton.toolTip == "choose a model checkpoint file"

    panel.parameters.checkpointPath = checkpoint
    assert panel.ui.segmentButton.enabled
    assert "liver, spleen" in panel.ui.modelInfoLabel.text and "hiera_t" in panel.ui.modelInfoLabel.text
    assert "64 x 64" in panel.ui.modelInfoLabel.text
    assert panel.ui.sliceEndSpinBox.maximum == 5  # 6 axial slices in the oblique test volume
    assert not panel.ui.sliceStartSpinBox.enabled

    panel.parameters.useSliceRange = True
    panel.parameters.sliceStart, panel.parameters.sliceEnd = 4, 2
    assert not panel.ui.segmentButton.enabled and "last slice" in panel.ui.segmentButton.toolTip
    panel.parameters.useSliceRange = False

    panel.answerProbe(cuda=[])
    assert panel.ui.deviceInfoLabel.text == "Found: torch 2.5.1: CPU"
    panel.parameters.device = panel.module.Device.cuda
    assert not panel.ui.segmentButton.enabled and "CUDA GPU is not available" in panel.ui.segmentButton.toolTip
    panel.parameters.device = panel.module.Device.auto
    assert panel.ui.segmentButton.enabled


def test_slice_range_along_the_models_plane_follows_the_model(panel: Panel, tmp_path: Path) -> None:
    from SAM2UNetSlicerLib.Parameters import SliceAxis, sliceCountAlongAxis

    from sam2unet_core.io.orientation import plane_view

    metadata = ModelMetadata(architecture=Architecture(backbone="hiera_t", num_classes=2),
                             labels=default_labels(2, ["brain"]), input_size=64, plane="sagittal")
    sagittalModel = tmp_path / "sagittal.safetensors"
    save_model(SAM2UNet(backbone="hiera_t", num_classes=2), sagittalModel, metadata)
    panel.parameters.inputVolume = panel.addVolume()
    assert panel.parameters.sliceAxis is SliceAxis.model
    assert "once the model is read" in panel.ui.sliceRangeLabel.text

    panel.parameters.checkpointPath = sagittalModel
    sagittal = sliceCountAlongAxis(obliqueIjkToRas(), SHAPE_KJI[::-1], SliceAxis.sagittal, plane_view)
    assert sagittal != SHAPE_KJI[0]  # not the axial count: the test tells the planes apart
    assert panel.ui.sliceEndSpinBox.maximum == sagittal - 1
    assert f"of {sagittal} slices" in panel.ui.sliceRangeLabel.text

    panel.parameters.sliceAxis = SliceAxis.axial
    assert panel.ui.sliceEndSpinBox.maximum == SHAPE_KJI[0] - 1


def test_checkpoint_is_remembered_across_sessions(monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> None:
    first = Panel(monkeypatch)
    first.parameters.checkpointPath = checkpoint
    settings = dict(first.module.qt.QSettings.store)
    assert first.ui.checkpointPathLineEdit.historyAdds == 1

    second = Panel(monkeypatch)  # a new Slicer session: fresh scene and parameter node
    monkeypatch.setattr(second.module.qt.QSettings, "store", settings)
    second.widget.initializeParameterNode()
    assert second.parameters.checkpointPath == checkpoint


def test_segment_then_cancel_through_the_buttons_leaves_the_scene_as_it_was(panel: Panel, checkpoint: Path) -> None:
    volume = panel.addVolume()
    panel.widget.initializeParameterNode()  # picks the first volume
    assert panel.parameters.inputVolume is volume
    panel.parameters.checkpointPath = checkpoint

    panel.ui.segmentButton.emit("clicked(bool)", False)
    assert panel.logicRunner.argument("-m") == str(checkpoint)
    assert panel.logicRunner.argument("--batch-size") == "8" and panel.logicRunner.argument("--device") == "auto"
    assert panel.nodeNames() == ["CT", "CT segmentation"]
    assert panel.parameters.outputSegmentation.GetName() == "CT segmentation"
    assert panel.ui.cancelButton.enabled and not panel.ui.segmentButton.enabled
    assert panel.widget._timer.active

    panel.logicRunner.emit(json.dumps({"event": "case_start", "case": "input", "slices": 6}),
                           json.dumps({"event": "slices", "case": "input", "done": 2, "total": 6}))
    panel.widget._poll()
    assert (panel.ui.progressBar.value, panel.ui.progressBar.maximum) == (2, 6)
    assert panel.ui.statusLabel.text == "Segmenting: slice 2 of 6"

    panel.ui.cancelButton.emit("clicked(bool)", False)
    assert panel.logicRunner.cancelled == 1
    assert panel.nodeNames() == ["CT"]
    assert panel.parameters.outputSegmentation is None
    assert panel.ui.segmentButton.enabled and not panel.ui.cancelButton.enabled
    assert panel.ui.statusLabel.text == "Cancelled"
    assert panel.slicer.dialogs == []


def finish_run_with_labels(panel: Panel) -> None:
    """Play the CLI's part of a run: a label map of ones on the exported input's grid, its
    case_done event, a clean exit; then let the panel poll."""
    inputPath = Path(panel.logicRunner.argument("-i"))
    outputPath = Path(panel.logicRunner.argument("-o")) / "input.nii.gz"
    outputPath.parent.mkdir()
    labels = sitk.GetImageFromArray(np.ones(SHAPE_KJI, np.uint8))
    labels.CopyInformation(sitk.ReadImage(str(inputPath)))
    sitk.WriteImage(labels, str(outputPath))
    panel.logicRunner.emit(json.dumps({"event": "case_done", "case": "input", "output": str(outputPath), "seconds": 1}))
    panel.logicRunner.finish(0)
    panel.widget._poll()


def test_successful_run_shows_segments_time_and_log(panel: Panel, checkpoint: Path) -> None:
    panel.parameters.inputVolume = panel.addVolume("Liver CT")
    panel.parameters.checkpointPath = checkpoint
    panel.parameters.precision = panel.module.Precision.fp32  # Advanced > Precision
    panel.ui.segmentButton.emit("clicked(bool)", False)
    assert panel.logicRunner.argument("--precision") == "fp32"
    finish_run_with_labels(panel)

    output = panel.parameters.outputSegmentation
    assert output.GetName() == "Liver CT segmentation"
    assert [s.name for s in output.GetSegmentation().segments.values()] == ["liver", "spleen"]
    assert panel.ui.statusLabel.text == "2 segment(s) in Liver CT segmentation"
    assert panel.ui.timeLabel.text.endswith(" s")
    assert panel.ui.logTextEdit.lines[-1].startswith("succeeded: ")
    assert (panel.ui.progressBar.value, panel.ui.progressBar.maximum) == (1, 1)


def test_failed_run_shows_an_error_with_the_log(panel: Panel, checkpoint: Path) -> None:
    panel.parameters.inputVolume = panel.addVolume()
    panel.parameters.checkpointPath = checkpoint
    panel.ui.segmentButton.emit("clicked(bool)", False)
    panel.logicRunner.emit(json.dumps({"event": "case_error", "case": "input", "error": "CUDA out of memory"}))
    panel.logicRunner.finish(1)
    panel.widget._poll()
    [(kind, text)] = panel.slicer.dialogs
    assert kind == "error" and "CUDA out of memory" in text
    assert panel.nodeNames() == ["CT"]


def fakeEnvironment(monkeypatch: pytest.MonkeyPatch, installed: dict[str, str], pyTorchUtils: bool,
                    coreInstalled: bool):
    """Pretend which packages Slicer's Python has. Returns ``(beforeSetup, installTorchCalls)``."""
    realFindSpec = importlib.util.find_spec
    hidden = {"PyTorchUtils": pyTorchUtils, "sam2unet_core": coreInstalled}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: (object() if hidden[name] else None) if name in hidden else realFindSpec(name, *args))
    calls: list[dict] = []

    class PyTorchUtilsLogic:
        def installTorch(self, **kwargs):
            calls.append(kwargs)
            installed["torch"] = "2.5.1+cu124"
            return SimpleNamespace(__version__="2.5.1+cu124")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))

    def beforeSetup(module) -> None:
        monkeypatch.setattr(module, "installedVersions", lambda names=None: dict(installed))

    return beforeSetup, calls


def test_without_torch_or_the_pytorch_extension_the_user_is_told_what_to_install(monkeypatch, checkpoint) -> None:
    beforeSetup, _ = fakeEnvironment(monkeypatch, {"numpy": "1.26.4"}, pyTorchUtils=False, coreInstalled=False)
    panel = Panel(monkeypatch, beforeSetup=beforeSetup)
    panel.parameters.inputVolume = panel.addVolume()
    panel.parameters.checkpointPath = checkpoint
    panel.ui.segmentButton.emit("clicked(bool)", False)
    [(kind, text)] = panel.slicer.dialogs
    assert kind == "error" and "'PyTorch' extension" in text
    assert panel.logicRunner.started == [] and panel.nodeNames() == ["CT"]


def test_first_use_installs_after_confirmation_then_segments(monkeypatch, checkpoint) -> None:
    installed = {"numpy": "1.26.4", "simpleitk": "2.4.0"}
    beforeSetup, torchCalls = fakeEnvironment(monkeypatch, installed, pyTorchUtils=True, coreInstalled=False)
    panel = Panel(monkeypatch, beforeSetup=beforeSetup)
    panel.parameters.inputVolume = panel.addVolume()
    panel.parameters.checkpointPath = checkpoint
    panel.ui.segmentButton.emit("clicked(bool)", False)

    [(kind, text)] = panel.slicer.dialogs
    assert kind == "confirm" and "PyTorch extension" in text and "numpy, SimpleITK, pydicom and pillow are kept" in text
    assert "sam2unet_core 0.1.0" in text and "Download: about 15 MB plus PyTorch" in text
    assert torchCalls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.5.1"}]
    args, env = panel.logicRunner.started[0]
    # sam2unet_core from the extension (here the clone the module runs from), never an index name
    assert args[1:7] == ["-m", "pip", "install", "--no-deps", "--no-build-isolation", str(REPO)]
    assert env["SAM2_BUILD_CUDA"] == "0"
    constraintsPath = Path(args[args.index("-c") + 1])
    constraints = constraintsPath.read_text(encoding="utf-8").split()
    assert constraints == ["numpy==1.26.4", "SimpleITK==2.4.0", "torch==2.5.1+cu124"]
    assert panel.ui.cancelButton.enabled and not panel.ui.segmentButton.enabled

    panel.logicRunner.emit("Successfully installed sam2unet-core-0.1.0 sam2-1.1.0")
    panel.logicRunner.finish(0)
    panel.widget._poll()
    args, env = panel.logicRunner.started[1]
    assert args[3] == "install" and "safetensors>=0.4" in args and "SAM2_BUILD_CUDA" not in env
    panel.logicRunner.finish(0)
    panel.widget._poll()
    args, env = panel.logicRunner.started[2]  # then the segmentation starts by itself
    assert args[1:3] == ["-m", "sam2unet_core.cli.predict"]
    assert panel.nodeNames() == ["CT", "CT segmentation"]
    assert not constraintsPath.exists()  # removed once pip is done
    panel.closeMidRun()


def test_declined_or_failed_installation_changes_nothing(monkeypatch: pytest.MonkeyPatch, checkpoint: Path) -> None:
    beforeSetup, _ = fakeEnvironment(monkeypatch, {"torch": "2.5.1"}, pyTorchUtils=True, coreInstalled=False)
    declined = Panel(monkeypatch, confirm=False, beforeSetup=beforeSetup)
    declined.parameters.inputVolume = declined.addVolume()
    declined.parameters.checkpointPath = checkpoint
    declined.ui.segmentButton.emit("clicked(bool)", False)
    assert declined.logicRunner.started == [] and declined.nodeNames() == ["CT"]

    failing = Panel(monkeypatch, beforeSetup=beforeSetup)
    failing.parameters.inputVolume = failing.addVolume()
    failing.parameters.checkpointPath = checkpoint
    failing.ui.segmentButton.emit("clicked(bool)", False)
    failing.logicRunner.emit("ERROR: No matching distribution found for sam2>=1.1.0")
    failing.logicRunner.finish(1)
    failing.widget._poll()
    kind, text = failing.slicer.dialogs[-1]
    assert kind == "error" and "Installing the dependencies failed: ERROR: No matching distribution found for sam2" in text
    assert "internet" not in text
    assert len(failing.logicRunner.started) == 1 and failing.nodeNames() == ["CT"]
    assert failing.ui.segmentButton.enabled


def test_poll_timer_keeps_running_from_one_pip_step_to_the_next(monkeypatch, checkpoint) -> None:
    """A runner that finishes and is restarted from its own callback (the next pip step, then
    the segmentation) must still be polled: the QTimer may stop only when nothing runs."""
    installed = {"numpy": "1.26.4", "simpleitk": "2.4.0", "torch": "2.5.1"}
    beforeSetup, _ = fakeEnvironment(monkeypatch, installed, pyTorchUtils=True, coreInstalled=False)
    panel = Panel(monkeypatch, beforeSetup=beforeSetup)
    panel.answerProbe(cuda=[])  # the device probe is long done when the user presses Segment
    panel.parameters.inputVolume = panel.addVolume()
    panel.parameters.checkpointPath = checkpoint
    panel.ui.segmentButton.emit("clicked(bool)", False)
    assert panel.widget._timer.active and len(panel.logicRunner.started) == 1
    panel.logicRunner.finish(0)
    panel.widget._poll()
    assert len(panel.logicRunner.started) == 2 and panel.widget._timer.active  # second pip step
    panel.logicRunner.finish(0)
    panel.widget._poll()  # pip done: the segmentation starts (and a new device probe)
    panel.answerProbe(cuda=[])
    assert panel.logicRunner.isRunning() and panel.widget._timer.active
    panel.closeMidRun()


def test_default_input_is_a_plain_scalar_volume_never_a_labelmap_or_vector_volume(panel: Panel) -> None:
    """The selector lists exactly vtkMRMLScalarVolumeNode (showChildNodeTypes false), so the
    default input must not be a labelmap or vector volume, which are its subclasses in MRML."""
    scene = panel.slicer.mrmlScene
    scene.addVolume("labels", np.zeros(SHAPE_KJI, np.uint8), obliqueIjkToRas(), "vtkMRMLLabelMapVolumeNode")
    scene.addVolume("photo", np.zeros(SHAPE_KJI, np.uint8), obliqueIjkToRas(), "vtkMRMLVectorVolumeNode")
    ct = panel.addVolume("CT")
    panel.widget.initializeParameterNode()
    assert panel.parameters.inputVolume is ct


def test_pt_checkpoint_is_described_in_the_background_and_the_panel_returns_at_once(
        panel: Panel, checkpoint: Path, tmp_path: Path) -> None:
    """A 900 MB official .pth (sparse file here) must not be loaded on the GUI thread."""
    import time

    from sam2unet_core.metadata import read_safetensors_metadata

    big = tmp_path / "SAM2-UNet-official.pth"
    with open(big, "wb") as handle:
        handle.truncate(900 * 1024 * 1024)
    started = time.perf_counter()
    panel.parameters.checkpointPath = big
    seconds = time.perf_counter() - started
    assert seconds < 0.1, f"choosing a 900 MB checkpoint took {seconds:.3f} s on the GUI thread"
    assert panel.ui.modelInfoLabel.text == "Reading the model details..."
    assert panel.describeRunner.args == [sys.executable, "-m", "sam2unet_core.cli.describe", str(big)]
    assert panel.widget._timer.active
    panel.describeRunner.emit(read_safetensors_metadata(checkpoint).to_json())
    panel.describeRunner.finish(0)
    panel.widget._poll()
    assert "liver, spleen" in panel.ui.modelInfoLabel.text

    panel.parameters.checkpointPath = checkpoint  # a newer choice cancels a pending description
    panel.parameters.checkpointPath = big
    panel.parameters.checkpointPath = checkpoint
    assert panel.describeRunner.cancelled >= 2 and "liver, spleen" in panel.ui.modelInfoLabel.text


def test_pt_checkpoint_before_the_dependencies_are_installed_says_so(panel: Panel, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    findSpec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "sam2unet_core" else findSpec(name, *args))
    official = tmp_path / "SAM2-UNet-official.pth"
    official.write_bytes(b"weights")
    panel.parameters.checkpointPath = official
    assert panel.ui.modelInfoLabel.text.startswith("Model details appear once the dependencies are installed")
    assert panel.describeRunner.started == []


# ------------------------------------------------------------------------------ ONNX route
@pytest.fixture(scope="module")
def onnxModel(checkpoint: Path) -> Path:
    """The organs checkpoint exported by sam2unet-export's library call (classes in the file)."""
    from sam2unet_core.checkpoint import load_model
    from sam2unet_core.export.onnx import export_onnx

    return export_onnx(load_model(checkpoint), checkpoint.with_suffix(".onnx"))


def describeForReal(model: Path) -> tuple[list[str], int]:
    """What the panel's describe child prints for ``model``: the real command, run here."""
    import subprocess

    from SAM2UNetSlicerLib.ModelInfo import describeCommand

    done = subprocess.run(describeCommand(sys.executable, model), capture_output=True, text=True, timeout=300)
    return (done.stdout + done.stderr).splitlines(), done.returncode


def answerOnnxProbe(panel: Panel, providers: list[str]) -> None:
    """The probe's JSON line as DeviceProbe.py onnx prints it, with ``providers`` as ONNX
    Runtime would list them (the one faked value: this machine has no onnxruntime-gpu)."""
    assert panel.probeRunner.args[-1] == "onnx"
    panel.probeRunner.emit(json.dumps({"probe": "sam2unet-device-probe", "runtime": "onnx", "torch": "", "cuda": [],
                                       "mps": False, "onnxruntime": "1.20.1", "providers": providers, "error": ""}))
    panel.probeRunner.finish(0)
    panel.widget._poll()


def comboChoices(panel: Panel) -> list[str]:
    model = panel.ui.deviceComboBox.model()
    return [device.name for row, device in enumerate(panel.module.Device) if model.item(row).isEnabled()]


def test_onnx_model_shows_its_classes_and_devices_follow_the_onnx_runtime_providers(panel: Panel, onnxModel: Path) -> None:
    panel.parameters.inputVolume = panel.addVolume()
    panel.answerProbe(cuda=["NVIDIA A100 (80 GB)"])  # torch sees a GPU: all but MPS offered
    assert comboChoices(panel) == ["auto", "cuda", "cpu"]

    panel.parameters.checkpointPath = onnxModel
    assert panel.ui.modelInfoLabel.text == "Reading the model details..."  # a child process reads it
    assert panel.describeRunner.args == [sys.executable, "-m", "sam2unet_core.cli.describe", str(onnxModel)]
    lines, returnCode = describeForReal(onnxModel)
    panel.describeRunner.emit(*lines)
    panel.describeRunner.finish(returnCode)
    panel.widget._poll()
    assert "liver, spleen" in panel.ui.modelInfoLabel.text and "hiera_t" in panel.ui.modelInfoLabel.text

    # ONNX Runtime without its CUDA provider (the onnxruntime package): CPU only.
    assert panel.probeRunner.args[2:] == ["onnx"]
    answerOnnxProbe(panel, ["CPUExecutionProvider"])
    assert panel.ui.deviceInfoLabel.text == "Found: onnxruntime 1.20.1: CPU"
    assert comboChoices(panel) == ["auto", "cpu"]
    panel.parameters.device = panel.module.Device.cuda
    assert not panel.ui.segmentButton.enabled and "CUDA GPU is not available" in panel.ui.segmentButton.toolTip
    panel.parameters.device = panel.module.Device.mps
    assert not panel.ui.segmentButton.enabled and "Apple MPS is not available" in panel.ui.segmentButton.toolTip
    panel.parameters.device = panel.module.Device.cpu
    panel.parameters.precision = panel.module.Precision.fp32  # an ONNX file has its own precision
    assert not panel.ui.segmentButton.enabled and "precision auto" in panel.ui.segmentReasonLabel.text
    panel.parameters.precision = panel.module.Precision.auto
    assert panel.ui.segmentButton.enabled

    # onnxruntime-gpu: CUDA offered too, and the run gets --device cuda.
    panel.ui.refreshDevicesButton.emit("clicked(bool)", False)
    answerOnnxProbe(panel, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert panel.ui.deviceInfoLabel.text == "Found: onnxruntime 1.20.1: CUDA, CPU"
    assert comboChoices(panel) == ["auto", "cuda", "cpu"]
    panel.parameters.device = panel.module.Device.cuda
    assert panel.ui.segmentButton.enabled
    panel.ui.segmentButton.emit("clicked(bool)", False)
    assert panel.logicRunner.args[:3] == [sys.executable, "-m", "sam2unet_core.cli.describe"]  # labels first
    panel.logicRunner.emit(*lines)
    panel.logicRunner.finish(0)
    panel.widget._poll()
    assert panel.logicRunner.argument("-m") == str(onnxModel) and panel.logicRunner.argument("--device") == "cuda"
    panel.ui.cancelButton.emit("clicked(bool)", False)

    # Back to the PyTorch checkpoint: torch is probed again.
    panel.parameters.checkpointPath = onnxModel.with_suffix(".safetensors")
    assert panel.probeRunner.args[-1].endswith("DeviceProbe.py")


def test_onnx_first_use_installs_onnxruntime_and_never_pytorch(monkeypatch: pytest.MonkeyPatch, onnxModel: Path) -> None:
    installed = {"numpy": "1.26.4", "simpleitk": "2.4.0"}  # a fresh Slicer, no PyTorch extension
    beforeSetup, torchCalls = fakeEnvironment(monkeypatch, installed, pyTorchUtils=False, coreInstalled=False)
    panel = Panel(monkeypatch, beforeSetup=beforeSetup)
    panel.parameters.inputVolume = panel.addVolume()
    panel.parameters.checkpointPath = onnxModel
    assert panel.ui.modelInfoLabel.text.startswith("Model details appear once the dependencies are installed")
    panel.ui.segmentButton.emit("clicked(bool)", False)

    [(kind, text)] = panel.slicer.dialogs
    assert kind == "confirm" and "onnxruntime>=1.17" in text and "no PyTorch" in text
    assert "PyTorch extension" not in text and "sam2" not in text.replace("sam2unet", "")
    assert torchCalls == []
    args, env = panel.logicRunner.started[0]
    assert args[3:7] == ["install", "--no-deps", "--no-build-isolation", str(REPO)]
    assert "SAM2_BUILD_CUDA" not in env
    constraintsPath = Path(args[args.index("-c") + 1])
    assert constraintsPath.read_text(encoding="utf-8").split() == ["numpy==1.26.4", "SimpleITK==2.4.0"]
    panel.logicRunner.finish(0)
    panel.widget._poll()
    args, _ = panel.logicRunner.started[1]
    packages = args[4:args.index("-c")]
    assert packages[0] == "onnxruntime>=1.17" and "nibabel>=5.2" in packages
    assert not [p for p in packages if p.lower().startswith(("torch", "sam2", "monai", "hydra", "numpy", "simpleitk"))]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object())  # pip installed them
    panel.logicRunner.finish(0)
    panel.widget._poll()
    args, _ = panel.logicRunner.started[2]  # then the run starts by itself: describe the .onnx, then predict
    assert args[1:] == ["-m", "sam2unet_core.cli.describe", str(onnxModel)]
    # The torch probe started with the panel ends (no torch here); ONNX Runtime is probed next.
    assert panel.probeRunner.args[-1].endswith("DeviceProbe.py")
    panel.probeRunner.emit(json.dumps({"probe": "sam2unet-device-probe", "torch": "", "cuda": [], "mps": False,
                                       "error": "ModuleNotFoundError: No module named 'torch'"}))
    panel.probeRunner.finish(0)
    panel.widget._poll()
    answerOnnxProbe(panel, ["CPUExecutionProvider"])
    assert panel.ui.deviceInfoLabel.text == "Found: onnxruntime 1.20.1: CPU"
    panel.closeMidRun()


# ------------------------------------------------------------- models that cannot segment
def _describeAs(panel: Panel, path: Path, metadata: ModelMetadata) -> None:
    """Choose ``path`` and let the describe child answer with ``metadata``."""
    path.write_bytes(b"weights")
    panel.parameters.checkpointPath = path
    panel.describeRunner.emit(metadata.to_json())
    panel.describeRunner.finish(0)
    panel.widget._poll()


def test_sam2_checkpoint_is_refused_next_to_the_model_unless_allowed(panel: Panel, tmp_path: Path) -> None:
    panel.parameters.inputVolume = panel.addVolume()
    sam2 = ModelMetadata(architecture=Architecture(backbone="hiera_t"),
                         provenance={"source": "sam2", "file": "sam2.1_hiera_tiny.pt", "note": "decoder not trained"})
    _describeAs(panel, tmp_path / "sam2.1_hiera_tiny.pt", sam2)
    problem = panel.ui.modelProblemLabel.text
    assert "sam2.1_hiera_tiny.pt is a SAM 2 checkpoint" in problem and "Train or fine-tune" in problem
    assert "Allow an untrained model" in problem
    assert not panel.ui.segmentButton.enabled
    assert panel.ui.segmentReasonLabel.text.startswith("Segment is unavailable: the model cannot segment")

    panel.parameters.allowUntrained = True
    assert panel.ui.modelProblemLabel.text == "" and panel.ui.segmentButton.enabled
    assert panel.ui.segmentReasonLabel.text == ""
    panel.ui.segmentButton.emit("clicked(bool)", False)
    assert panel.logicRunner.args[2] == "sam2unet_core.cli.describe"  # a .pt is read again before the run
    panel.logicRunner.emit(sam2.to_json())
    panel.logicRunner.finish(0)
    panel.widget._poll()
    assert panel.logicRunner.args[2] == "sam2unet_core.cli.predict" and "--allow-untrained" in panel.logicRunner.args
    panel.closeMidRun()


def test_rgb_picture_model_is_refused_for_a_volume_even_when_untrained_models_are_allowed(
        panel: Panel, tmp_path: Path) -> None:
    panel.parameters.inputVolume = panel.addVolume()
    polyp = ModelMetadata(architecture=Architecture(backbone="hiera_t"), labels=default_labels(1, ["foreground"]),
                          provenance={"source": "official_sam2unet", "file": "SAM2-UNet-20.pth"})
    panel.parameters.allowUntrained = True
    _describeAs(panel, tmp_path / "SAM2-UNet-20.pth", polyp)
    assert "colour pictures" in panel.ui.modelProblemLabel.text
    assert not panel.ui.segmentButton.enabled and "cannot segment" in panel.ui.segmentReasonLabel.text
    assert "foreground" in panel.ui.modelInfoLabel.text  # the model is still described


def test_tta_and_largest_component_reach_the_cli_and_show_3d_acts_after_the_run(panel: Panel, checkpoint: Path) -> None:
    panel.parameters.inputVolume = panel.addVolume("Liver CT")
    panel.parameters.checkpointPath = checkpoint
    assert not panel.ui.show3DButton.enabled  # nothing segmented yet
    panel.parameters.tta = True
    panel.parameters.keepLargestComponent = True
    panel.ui.segmentButton.emit("clicked(bool)", False)
    args = panel.logicRunner.args
    assert "--tta" in args and panel.logicRunner.argument("--postprocess") == "largest_component"
    assert "--allow-untrained" not in args
    finish_run_with_labels(panel)

    output = panel.parameters.outputSegmentation
    assert not output.closedSurface and panel.ui.show3DButton.enabled
    panel.ui.show3DButton.emit("clicked(bool)", False)
    assert output.closedSurface and panel.ui.statusLabel.text == "Segments shown in 3D"


def test_largest_component_is_offered_only_for_pytorch_models(panel: Panel, tmp_path: Path) -> None:
    panel.parameters.inputVolume = panel.addVolume()
    panel.parameters.keepLargestComponent = True
    onnx = tmp_path / "organs.onnx"
    _describeAs(panel, onnx, ModelMetadata(architecture=Architecture(backbone="hiera_t", num_classes=3),
                                           labels=default_labels(3, ["liver", "spleen"]), input_size=64))
    assert not panel.ui.keepLargestCheckBox.enabled and not panel.ui.segmentButton.enabled
    assert "largest part needs a PyTorch model" in panel.ui.segmentReasonLabel.text
    panel.parameters.keepLargestComponent = False
    assert panel.ui.segmentButton.enabled and panel.ui.segmentReasonLabel.text == ""


# ------------------------------------------------------------- the package the extension carries
def test_another_installed_sam2unet_core_is_reported_with_an_upgrade_path(monkeypatch, checkpoint) -> None:
    installed = {"numpy": "1.26.4", "simpleitk": "2.4.0", "torch": "2.5.1", "sam2unet-core": "0.0.9"}
    beforeSetup, _ = fakeEnvironment(monkeypatch, installed, pyTorchUtils=True, coreInstalled=True)
    panel = Panel(monkeypatch, beforeSetup=beforeSetup)
    message = "sam2unet_core 0.0.9 is installed, but this extension carries 0.1.0"
    assert panel.ui.packageStatusLabel.text.startswith(message) and panel.ui.statusLabel.text.startswith(message)
    assert panel.ui.installButton.text == "Upgrade / Reinstall sam2unet_core"
    assert panel.ui.advancedCollapsibleButton.collapsed is False

    panel.ui.installButton.emit("clicked(bool)", False)
    [(kind, text)] = panel.slicer.dialogs
    assert kind == "confirm" and "sam2unet_core 0.1.0 from this extension, replacing 0.0.9" in text
    args, _ = panel.logicRunner.started[0]
    assert args[3:8] == ["install", "--no-deps", "--no-build-isolation", "--force-reinstall", str(REPO)]
    closeMidInstall(panel)


def test_same_version_installed_is_stated_and_a_legacy_index_name_setting_is_ignored(monkeypatch) -> None:
    installed = {"numpy": "1.26.4", "simpleitk": "2.4.0", "sam2unet-core": "0.1.0"}
    beforeSetup, _ = fakeEnvironment(monkeypatch, installed, pyTorchUtils=True, coreInstalled=True)
    slicerModules = {}

    def remember(module) -> None:
        beforeSetup(module)
        module.qt.QSettings().setValue(module.SETTINGS_CORE_SOURCE, "sam2unet-core")
        slicerModules["module"] = module

    panel = Panel(monkeypatch, beforeSetup=remember)
    assert panel.ui.coreSourceLineEdit.text == ""
    assert panel.ui.packageStatusLabel.text == "sam2unet_core 0.1.0 is installed."
    assert panel.ui.installButton.text == "Install dependencies"


def test_a_folder_of_wheels_makes_every_pip_call_offline(monkeypatch, checkpoint, tmp_path: Path) -> None:
    installed = {"numpy": "1.26.4", "simpleitk": "2.4.0", "torch": "2.5.1"}
    beforeSetup, _ = fakeEnvironment(monkeypatch, installed, pyTorchUtils=True, coreInstalled=False)
    panel = Panel(monkeypatch, beforeSetup=beforeSetup)
    panel.ui.coreSourceLineEdit.text = str(tmp_path)
    panel.ui.coreSourceLineEdit.emit("editingFinished()")
    assert f"Offline: every package comes from {tmp_path}." in panel.ui.packageStatusLabel.text
    panel.ui.installButton.emit("clicked(bool)", False)
    args, _ = panel.logicRunner.started[0]
    assert args[args.index("--find-links") + 1] == str(tmp_path) and "--no-index" in args
    assert str(REPO) in args  # no sam2unet_core wheel in the folder: the extension's copy
    closeMidInstall(panel)


def closeMidInstall(panel: Panel) -> None:
    """Close the module during an install, as quitting Slicer does: pip is stopped and its
    temporary constraints folder removed."""
    folder = panel.widget.installer._folder
    assert folder is not None and folder.is_dir()
    panel.widget.cleanup()
    assert not panel.widget.installer.isRunning() and not folder.exists()


# ------------------------------------------------------------------------------ Train section
def addSegmentation(panel: Panel, name: str, segments: list[str]):
    node = panel.slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    for segment in segments:
        node.GetSegmentation().AddEmptySegment("", segment, (1.0, 0.0, 0.0))
    return node


def test_training_pairs_and_segments_to_learn_decide_when_train_is_enabled(panel: Panel) -> None:
    assert not panel.ui.trainButton.enabled and "add at least one training pair" in panel.ui.trainReasonLabel.text
    assert "SAM2UNet/models" in panel.ui.trainDefaultsLabel.text and "10 minutes" in panel.ui.trainDefaultsLabel.text
    first, second = panel.addVolume("case 1"), panel.addVolume("case 2")
    panel.parameters.trainVolume, panel.parameters.trainSegmentation = first, addSegmentation(panel, "seg 1", ["liver", "spleen"])
    panel.ui.addPairButton.emit("clicked(bool)", False)
    panel.parameters.trainVolume, panel.parameters.trainSegmentation = second, addSegmentation(panel, "seg 2", ["liver", "kidney"])
    panel.ui.addPairButton.emit("clicked(bool)", False)
    panel.ui.addPairButton.emit("clicked(bool)", False)  # the same pair twice is one pair
    assert [item.text() for item in panel.ui.trainPairsList.items] == ["case 1 + seg 1", "case 2 + seg 2"]
    segments = panel.ui.trainSegmentsList.items
    assert [(item.text(), item.checkState()) for item in segments] == [("liver", 2), ("spleen", 2), ("kidney", 2)]
    assert panel.ui.trainButton.enabled and panel.ui.trainReasonLabel.text == ""

    for item in segments:  # the user unticks everything: nothing to learn
        item.setCheckState(0)
        panel.ui.trainSegmentsList.emit("itemChanged(QListWidgetItem*)", item)
    assert not panel.ui.trainButton.enabled and "tick at least one segment" in panel.ui.trainReasonLabel.text
    panel.ui.trainPairsList.currentRow = 1
    panel.ui.removePairButton.emit("clicked(bool)", False)
    assert [item.text() for item in panel.ui.trainSegmentsList.items] == ["liver", "spleen"]  # unticks remembered
    assert all(item.checkState() == 0 for item in panel.ui.trainSegmentsList.items)

    panel.parameters.trainBase = panel.module.TrainingBase.sam2  # a checkpoint is needed
    panel.ui.trainSegmentsList.items[0].setCheckState(2)
    panel.ui.trainSegmentsList.emit("itemChanged(QListWidgetItem*)", panel.ui.trainSegmentsList.items[0])
    assert not panel.ui.trainButton.enabled and "checkpoint or model to start from" in panel.ui.trainReasonLabel.text


def test_train_offers_only_the_devices_pytorch_found(panel: Panel) -> None:
    panel.parameters.trainVolume, panel.parameters.trainSegmentation = (
        panel.addVolume("case 1"), addSegmentation(panel, "seg", ["liver"]))
    panel.ui.addPairButton.emit("clicked(bool)", False)
    panel.answerProbe(cuda=[])  # torch found no GPU
    model = panel.ui.trainDeviceComboBox.model()
    assert [device.name for row, device in enumerate(panel.module.Device)
            if model.item(row).isEnabled()] == ["auto", "cpu"]
    panel.parameters.trainDevice = panel.module.Device.cuda
    assert not panel.ui.trainButton.enabled and "CUDA GPU is not available" in panel.ui.trainReasonLabel.text
    panel.parameters.trainDevice = panel.module.Device.cpu
    assert panel.ui.trainButton.enabled and panel.ui.trainReasonLabel.text == ""


def test_train_hands_the_panel_settings_to_the_logic_and_the_new_model_becomes_the_segment_model(
        panel: Panel, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume = panel.addVolume("case 1")
    panel.parameters.trainVolume, panel.parameters.trainSegmentation = volume, addSegmentation(panel, "seg", ["liver"])
    panel.ui.addPairButton.emit("clicked(bool)", False)
    sam2 = tmp_path / "sam2.1_hiera_tiny.pt"
    sam2.write_bytes(b"weights")
    panel.parameters.trainBase, panel.parameters.trainBasePath = panel.module.TrainingBase.sam2, sam2
    panel.parameters.trainMinutes = 25
    started = []
    monkeypatch.setattr(panel.widget.logic.training, "start", lambda pairs, names, settings: started.append(
        (pairs, names, settings)))
    routes = []
    monkeypatch.setattr(panel.widget, "_ensureDependencies", lambda then, route=None, training=False: routes.append((route, training)) or True)
    panel.ui.trainButton.emit("clicked(bool)", False)
    pairs, names, settings = started[0]
    assert routes == [(panel.module.ModelRoute.torch, True)]  # PyTorch and MONAI, whatever the Segment model
    assert [(p.volumeNode, p.segmentationNode.GetName()) for p in pairs] == [(volume, "seg")] and names == ["liver"]
    assert (settings.base.value, settings.basePath, settings.minutes, settings.plane.value) == ("sam2", sam2, 25.0, "axial")
    assert settings.output.parent == Path("/nonexistent/slicer.org/SAM2UNet/models")  # the default folder
    assert settings.output.name.startswith("model-") and settings.output.suffix == ".safetensors"
    assert panel.module.qt.QSettings.store[panel.module.SETTINGS_SAM2_CHECKPOINT] == str(sam2)  # remembered

    from SAM2UNetSlicerLib.TrainingLogic import TrainingResult

    panel.widget._onTrainingFinished(TrainingResult(panel.module.RunStatus.succeeded, "Model written", 60.0, checkpoint))
    assert panel.parameters.checkpointPath == checkpoint  # the Segment section's model now
    assert panel.ui.checkpointPathLineEdit.historyAdds == 1 and "liver, spleen" in panel.ui.modelInfoLabel.text
    assert panel.ui.trainStatusLabel.text == "Model written"
