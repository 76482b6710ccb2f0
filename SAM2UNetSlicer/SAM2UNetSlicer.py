"""SAM2-UNet segmentation in 3D Slicer: Module, parameter node, Widget, Logic and Test.

The work is done in ``SAM2UNetSlicerLib`` (no Slicer imports there, so plain pytest runs it);
this file only wires it to Slicer's GUI, scene and settings.
"""

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SAM2UNetSlicerLib.DeviceProbe import parseProbeOutput
from SAM2UNetSlicerLib.InstallLogic import (
    CORE_DISTRIBUTION,
    TORCH_REQUIREMENT,
    DependencyInstaller,
    EnsureOutcome,
    ModelRoute,
    coreVersionProblem,
    installedVersions,
    resolvePackageSource,
    routeOf,
)
from SAM2UNetSlicerLib.LabelImport import volumeIjkToRas
from SAM2UNetSlicerLib.ModelInfo import CheckpointDescriber, describeMetadata, modelProblem, readCheckpointMetadata
from SAM2UNetSlicerLib.Parameters import (Device, Precision, RunParameters, SliceAxis, TrainingBase, TrainingPlane,
                                          TrainingSettings, offeredDevices, sliceCountAlongAxis)
from SAM2UNetSlicerLib.ProcessRunner import SubprocessRunner, findPythonSlicer
from SAM2UNetSlicerLib.SegmentationLogic import RunResult, RunStatus, SegmentationLogic
from SAM2UNetSlicerLib.TrainingLogic import TrainingLogic, TrainingPair, TrainingProgress, TrainingResult, segmentNames
from SAM2UNetSlicerLib.WarmWorker import WarmPredictRunner

SETTINGS_CHECKPOINT = "SAM2UNetSlicer/CheckpointPath"
SETTINGS_CORE_SOURCE = "SAM2UNetSlicer/CoreSource"
SETTINGS_SAM2_CHECKPOINT = "SAM2UNetSlicer/Sam2CheckpointPath"  # the base of "SAM 2 / 2.1 checkpoint" training
LEGACY_CORE_SOURCE = "sam2unet-core"  # an index name earlier versions stored; no index has it
MODULE_DIR = Path(__file__).resolve().parent  # the bundled sam2unet_core sits beside this file
POLL_INTERVAL_MS = 100
_UNSET = object()  # "not shown yet", unlike None ("nothing chosen")


#
# Module
#


class SAM2UNetSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAM2-UNet")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorchUtils is used when present, not required to load
        self.parent.contributors = ["sam2unet_core project"]
        self.parent.helpText = _(
            "Segment a volume slice by slice with a SAM2-UNet checkpoint (U-shaped decoder on the "
            "adapter-tuned Hiera encoder of Segment Anything 2), or with its ONNX export, which runs "
            "with ONNX Runtime and needs no PyTorch. Runs in the background with progress and "
            "Cancel; segments are named and coloured from the model. Train a model: a new model (or a "
            "fine-tuned one) from volumes segmented in the scene, which then segments the next ones."
        )
        self.parent.acknowledgementText = _(
            "SAM2-UNet: Xiong et al. 2024 (arXiv 2408.08870). Segment Anything 2: Meta AI."
        )


#
# Parameter node
#


@parameterNodeWrapper
class SAM2UNetSlicerParameterNode:
    """Choices of the panel, saved with the scene.

    inputVolume - volume to segment. outputSegmentation - target; None creates
    "<volume> segmentation". checkpointPath - SAM2-UNet checkpoint (.safetensors, .pt, .pth) or
    ONNX export (.onnx: runs with ONNX Runtime, without PyTorch).
    device, sliceAxis - see SAM2UNetSlicerLib.Parameters. useSliceRange, sliceStart, sliceEnd -
    0-based inclusive slice range along sliceAxis. show3D - build the 3D surface.
    tta - average over flipped slices. keepLargestComponent - keep each segment's largest
    connected part. batchSize - slices per forward pass (lower it when the GPU runs out of
    memory). allowUntrained - run a SAM 2 checkpoint (untrained decoder), for smoke tests.
    precision - numeric precision of a PyTorch model (see SAM2UNetSlicerLib.Parameters).
    trainVolume, trainSegmentation - the training pair that Add pair adds. trainBase,
    trainBasePath, trainPlane, trainMinutes, trainDevice, trainOutputPath - the Train section's
    settings (SAM2UNetSlicerLib.Parameters.TrainingSettings; an empty output path writes a new
    file in the models folder under Slicer's settings folder).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    checkpointPath: Path
    device: Device
    sliceAxis: SliceAxis
    useSliceRange: bool = False
    sliceStart: Annotated[int, Minimum(0)] = 0
    sliceEnd: Annotated[int, Minimum(0)] = 0
    show3D: bool = False
    tta: bool = False
    keepLargestComponent: bool = False
    batchSize: Annotated[int, WithinRange(1, 512)] = 8
    allowUntrained: bool = False
    precision: Precision = Precision.auto
    trainVolume: vtkMRMLScalarVolumeNode
    trainSegmentation: vtkMRMLSegmentationNode
    trainBase: TrainingBase = TrainingBase.scratch
    trainBasePath: Path
    trainPlane: TrainingPlane = TrainingPlane.axial
    trainMinutes: Annotated[int, WithinRange(1, 1440)] = 10
    trainDevice: Device = Device.auto
    trainOutputPath: Path


def _pathOrNone(path: Path) -> Optional[Path]:
    """A Path parameter, or None when empty (an empty Path field reads back as ".")."""
    return None if str(path) in ("", ".") else path


def modelsFolder() -> Path:
    """Where trained models go by default: ``SAM2UNet/models`` beside Slicer's settings file."""
    return Path(qt.QSettings().fileName()).parent / "SAM2UNet" / "models"


def _checkpointOf(parameterNode) -> Optional[Path]:
    """The chosen checkpoint, or None (an empty Path field reads back as ".")."""
    return _pathOrNone(parameterNode.checkpointPath)


#
# Widget
#


class SAM2UNetSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._probeLines = []
        self._probeRuntime = None  # ModelRoute the running (or last) probe asks about
        self._deviceReport = None  # DeviceReport of the last probe
        self._shownCheckpoint = _UNSET  # what modelInfoLabel describes
        self._sliceLimitsFor = _UNSET  # (volume ID, axis) the slice spin boxes are limited for
        self._modelPlane: Optional[str] = None  # plane of the described model; None until it is read
        self._modelMetadata = None  # ModelMetadata of the described model; None until it is read
        self._trainingPairIds: list[tuple[str, str]] = []  # (volume ID, segmentation ID) of each training pair
        self._uncheckedSegments: set[str] = set()  # segment names the user unticked in "Segments to learn"

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAM2UNetSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SAM2UNetSlicerLogic()
        segmentation = self.logic.segmentation
        segmentation.onLog = self._log
        segmentation.onProgress = self._onProgress
        segmentation.onFinished = self._onSegmentationFinished
        training = self.logic.training
        training.onLog = self._log
        training.onProgress = self._onTrainingProgress
        training.onFinished = self._onTrainingFinished
        self._probeRunner = SubprocessRunner()
        self._describer = CheckpointDescriber(SubprocessRunner())  # .pt/.pth/.onnx: read in a child process
        self.installer = DependencyInstaller(  # shares the logic's runner: never both at once
            self.logic.runner, Path(self.resourcePath("requirements.txt")).parent, findPythonSlicer,
            lambda name: importlib.util.find_spec(name) is not None, installedVersions)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3DButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)
        self.ui.refreshDevicesButton.connect("clicked(bool)", self.probeDevices)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPairButton)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePairButton)
        self.ui.trainSegmentsList.connect("itemChanged(QListWidgetItem*)", self._onTrainSegmentTicked)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.trainCancelButton.connect("clicked(bool)", self.onTrainCancelButton)
        self.ui.trainDefaultsLabel.text = _(
            "Defaults: from scratch, axial plane, 10 minutes, device auto; the model is saved in {folder} "
            "unless a file is chosen. With 5 pairs or more, one is held out to measure the validation "
            "Dice; with fewer, it is measured on the training pairs (a check of the fit).").format(
                folder=modelsFolder())
        self.ui.trainProgressBar.setValue(0)
        source = qt.QSettings().value(SETTINGS_CORE_SOURCE, "")
        self.ui.coreSourceLineEdit.text = "" if source == LEGACY_CORE_SOURCE else source
        self.ui.coreSourceLineEdit.connect("editingFinished()", self._saveCoreSource)
        self.ui.progressBar.setValue(0)

        self.initializeParameterNode()
        self.probeDevices()
        self._updatePackageStatus()

    def cleanup(self) -> None:
        self.logic.segmentation.cancel()
        self.logic.training.cancel()
        self.installer.cancel()  # pip stopped, its constraints folder removed
        self.logic.worker.stop()
        self._probeRunner.cancel()
        self._describer.cancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.segmentation.cancel()  # its nodes are about to disappear
        self.logic.training.cancel()
        self._trainingPairIds = []
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            # Exactly scalar volumes: the selector hides labelmaps and vector volumes (subclasses).
            firstVolumeNode = next((node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                                    if node.GetClassName() == "vtkMRMLScalarVolumeNode"), None)
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if _checkpointOf(self._parameterNode) is None:
            remembered = qt.QSettings().value(SETTINGS_CHECKPOINT, "")
            if remembered and Path(remembered).is_file():
                self._parameterNode.checkpointPath = Path(remembered)
        self._refreshTrainingLists()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._shownCheckpoint = self._sliceLimitsFor = _UNSET
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Parameter node changed (from the GUI or a script): refresh what depends on it."""
        parameterNode = self._parameterNode
        if parameterNode:
            checkpoint = _checkpointOf(parameterNode)
            self.logic.worker.keepOnly(checkpoint, parameterNode.device.value)  # frees another model's worker
            if checkpoint != self._shownCheckpoint:
                self._shownCheckpoint = checkpoint
                self.onCheckpointChanged()
            volume = parameterNode.inputVolume
            limitsFor = (volume.GetID() if volume else None, parameterNode.sliceAxis)
            if limitsFor != self._sliceLimitsFor:
                self._sliceLimitsFor = limitsFor
                self._updateSliceLimits()
        self._checkCanApply()

    # ------------------------------------------------------------------ panel state
    def _route(self) -> ModelRoute:
        """ONNX for a chosen .onnx model, else PyTorch (also while no model is chosen)."""
        return routeOf(_checkpointOf(self._parameterNode) if self._parameterNode else None)

    def _busy(self) -> bool:
        return self.logic.segmentation.isRunning() or self.installer.isRunning() or self.logic.training.isRunning()

    def _checkCanApply(self) -> None:
        parameterNode = self._parameterNode
        reasons = []
        if self._busy():
            reasons.append(_("a run, a training or an installation is in progress"))
        if not parameterNode or not parameterNode.inputVolume:
            reasons.append(_("select an input volume"))
        checkpoint = _checkpointOf(parameterNode) if parameterNode else None
        if checkpoint is None or not checkpoint.is_file():
            reasons.append(_("choose a model checkpoint file"))
        if parameterNode and parameterNode.useSliceRange and parameterNode.sliceEnd < parameterNode.sliceStart:
            reasons.append(_("the last slice must not come before the first"))
        offered = offeredDevices(self._route(), self._deviceReport)
        self._showDeviceChoices(self.ui.deviceComboBox, offered)
        if parameterNode and parameterNode.device not in offered:
            reasons.append(_("{device} is not available here (see Device)").format(device=parameterNode.device.label()))
        problem = None
        if self._modelMetadata is not None and parameterNode:
            problem = modelProblem(self._modelMetadata, parameterNode.allowUntrained)
        self.ui.modelProblemLabel.text = problem or ""
        if problem:
            reasons.append(_("the model cannot segment this volume (the reason is shown under the model)"))
        onnx = self._route() is ModelRoute.onnx
        self.ui.keepLargestCheckBox.enabled = not onnx
        if onnx and parameterNode and parameterNode.keepLargestComponent:
            reasons.append(_("keeping the largest part needs a PyTorch model; untick it for an ONNX model"))
        if onnx and parameterNode and parameterNode.precision is not Precision.auto:
            reasons.append(_("an ONNX model runs at the precision it was exported with; choose precision auto"))
        self.ui.segmentButton.enabled = not reasons
        self.ui.segmentButton.toolTip = _("Segment the input volume") if not reasons else "; ".join(reasons)
        self.ui.segmentReasonLabel.text = "" if not reasons else _("Segment is unavailable: {reasons}.").format(
            reasons="; ".join(reasons))
        output = parameterNode.outputSegmentation if parameterNode else None
        self.ui.show3DButton.enabled = bool(output and output.GetSegmentation().GetNumberOfSegments()
                                            and not self._busy())
        self.ui.cancelButton.enabled = self.logic.segmentation.isRunning() or self.installer.isRunning()
        self.ui.installButton.enabled = not self._busy()
        self.ui.sliceStartSpinBox.enabled = bool(parameterNode and parameterNode.useSliceRange)
        self.ui.sliceEndSpinBox.enabled = bool(parameterNode and parameterNode.useSliceRange)
        self._checkCanTrain()

    @staticmethod
    def _showDeviceChoices(comboBox, offered: list) -> None:
        """Grey out the entries of a device combo box that are not ``offered`` (the combo
        lists the ``Device`` members in order, as the parameter node wrapper fills it)."""
        model = comboBox.model()
        for row, device in enumerate(Device):
            item = model.item(row)
            if item is not None:
                item.setEnabled(device in offered)

    def _updateSliceLimits(self) -> None:
        """Limit the slice range to the slices of the input along the chosen axis."""
        parameterNode = self._parameterNode
        if not parameterNode or not parameterNode.inputVolume or not parameterNode.inputVolume.GetImageData():
            return
        try:
            from sam2unet_core.io.orientation import plane_view  # the CLI's own rule
        except ImportError:  # dependencies not installed yet (or broken)
            self.ui.sliceRangeLabel.text = _("(checked when the run starts)")
            return
        if parameterNode.sliceAxis is SliceAxis.model and self._modelPlane is None:
            self.ui.sliceRangeLabel.text = _("(counted along the model's plane once the model is read)")
            return
        volume = parameterNode.inputVolume
        count = sliceCountAlongAxis(volumeIjkToRas(slicer, vtk, volume), volume.GetImageData().GetDimensions(),
                                    parameterNode.sliceAxis, plane_view, self._modelPlane or "axial")
        self.ui.sliceStartSpinBox.maximum = count - 1
        self.ui.sliceEndSpinBox.maximum = count - 1
        self.ui.sliceRangeLabel.text = _("of {count} slices (0-based, inclusive)").format(count=count)

    def onCheckpointChanged(self) -> None:
        """Show the model's details; returns at once (a .pt/.pth/.onnx is read in a child process).
        Probes the devices again when the model's runtime (torch or ONNX Runtime) changed."""
        self._describer.cancel()
        report = self._deviceReport
        if self._probeRuntime is not self._route() and not (report and report.runtime == self._route().value):
            self.probeDevices()  # another runtime: ask which devices it sees
        checkpoint = _checkpointOf(self._parameterNode) if self._parameterNode else None
        self._setModelPlane(None)
        self._modelMetadata = None
        if checkpoint is None:
            self.ui.modelInfoLabel.text = _("No model chosen")
            return
        try:
            metadata = readCheckpointMetadata(checkpoint)
            if metadata is None:
                self.ui.modelInfoLabel.text = _("Reading the model details...")
                self._describer.describe(findPythonSlicer(), checkpoint, dict(os.environ),
                                         lambda metadata, error: self._showModelInfo(checkpoint, metadata, error))
                self._timer.start()
                return
        except ImportError:  # dependencies not installed yet (or broken)
            self.ui.modelInfoLabel.text = _("Model details appear once the dependencies are installed (Segment installs them).")
            return
        except (ValueError, OSError, RuntimeError) as err:
            self.ui.modelInfoLabel.text = str(err)
            return
        self._showModelInfo(checkpoint, metadata, None)

    def _showModelInfo(self, checkpoint: Path, metadata, error: Optional[str]) -> None:
        if error is not None:
            self.ui.modelInfoLabel.text = error
            return
        self.ui.modelInfoLabel.text = describeMetadata(metadata)
        self._modelMetadata = metadata
        self._setModelPlane(metadata.plane)
        self._checkCanApply()
        qt.QSettings().setValue(SETTINGS_CHECKPOINT, str(checkpoint))
        self.ui.checkpointPathLineEdit.addCurrentPathToHistory()

    def _setModelPlane(self, plane: Optional[str]) -> None:
        """Remember the model's plane; the slice range along "Model's plane" follows it."""
        if plane != self._modelPlane:
            self._modelPlane = plane
            self._updateSliceLimits()

    def _saveCoreSource(self) -> None:
        qt.QSettings().setValue(SETTINGS_CORE_SOURCE, self.ui.coreSourceLineEdit.text.strip())
        self._updatePackageStatus()

    def _updatePackageStatus(self) -> None:
        """Say which sam2unet_core is installed against the one this extension carries; on a
        mismatch, offer Upgrade / Reinstall (the Install button) and open Advanced."""
        try:
            core, wheelhouse = resolvePackageSource(self.ui.coreSourceLineEdit.text, MODULE_DIR)
        except ValueError as err:
            self.ui.packageStatusLabel.text = str(err)
            return
        installed = installedVersions().get(CORE_DISTRIBUTION)
        problem = coreVersionProblem(installedVersions(), core)
        offline = _(" Offline: every package comes from {folder}.").format(folder=wheelhouse) if wheelhouse else ""
        if problem:
            text = problem
        elif installed:
            text = _("sam2unet_core {version} is installed.").format(version=installed)
        else:
            text = _("sam2unet_core {version} comes with this extension; the first Segment installs it.").format(
                version=core.version)
        self.ui.packageStatusLabel.text = text + offline
        self.ui.installButton.text = _("Upgrade / Reinstall sam2unet_core") if problem else _("Install dependencies")
        if problem:
            self.ui.advancedCollapsibleButton.collapsed = False
            self.ui.statusLabel.text = problem

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def _onProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.format = _("%v / %m slices")
        self.ui.progressBar.setRange(0, total)  # (0, 0): busy indicator until the size is known
        self.ui.progressBar.setValue(done)
        if total:
            self.ui.statusLabel.text = _("Segmenting: slice {done} of {total}").format(done=done, total=total)

    def _poll(self) -> None:
        self.logic.segmentation.poll()  # its runner also runs the pip steps
        self.logic.training.poll()
        self._probeRunner.poll()
        self._describer.runner.poll()
        # Ask again after polling: a callback may have started the next process on a runner
        # whose poll() just reported its previous process finished (next pip step, then Segment).
        if not (self.logic.runner.isRunning() or self.logic.segmentation.isRunning() or self._probeRunner.isRunning()
                or self._describer.runner.isRunning() or self.logic.training.isRunning()):
            self._timer.stop()

    # ------------------------------------------------------------------ devices
    def probeDevices(self) -> None:
        """Ask a child process which devices the model's runtime (torch, or ONNX Runtime for
        an .onnx model) sees; the panel stays responsive. A probe still running for the
        other runtime is followed by one for this runtime when it ends."""
        if self._probeRunner.isRunning():
            return
        self._probeLines = []
        self._probeRuntime = self._route()
        self.ui.deviceInfoLabel.text = _("Looking for GPUs...")
        probeScript = Path(__file__).parent / "SAM2UNetSlicerLib" / "DeviceProbe.py"
        runtimeArgs = ["onnx"] if self._probeRuntime is ModelRoute.onnx else []  # default: torch
        try:
            self._probeRunner.start([findPythonSlicer(), str(probeScript), *runtimeArgs], dict(os.environ),
                                    self._probeLines.append, self._onProbeFinished)
        except (OSError, RuntimeError) as err:
            self.ui.deviceInfoLabel.text = _("Device probe failed: {error}").format(error=err)
            return
        self._timer.start()

    def _onProbeFinished(self, returnCode: int) -> None:
        self._deviceReport = parseProbeOutput(self._probeLines, self._probeRuntime.value)
        self.ui.deviceInfoLabel.text = _("Found: {summary}").format(summary=self._deviceReport.summary())
        self._checkCanApply()
        if self._probeRuntime is not self._route():  # the model changed runtime meanwhile
            self.probeDevices()

    # ------------------------------------------------------------------ segment
    def onSegmentButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to prepare the dependencies.")):
            if not self._ensureDependencies(then=self._startSegmentation):
                return
        self._startSegmentation()

    def _startSegmentation(self) -> None:
        parameterNode = self._parameterNode
        sliceRange = (parameterNode.sliceStart, parameterNode.sliceEnd) if parameterNode.useSliceRange else None
        params = RunParameters(_checkpointOf(parameterNode) or Path(), parameterNode.device,
                               parameterNode.sliceAxis, sliceRange, parameterNode.batchSize,
                               tta=parameterNode.tta, keepLargestComponent=parameterNode.keepLargestComponent,
                               allowUntrained=parameterNode.allowUntrained, precision=parameterNode.precision)
        self.ui.logTextEdit.clear()
        self.ui.timeLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            output = self.logic.segmentation.start(parameterNode.inputVolume, parameterNode.outputSegmentation,
                                                   params, parameterNode.show3D)
            parameterNode.outputSegmentation = output
            self.ui.statusLabel.text = _("Starting...")
            self._onProgress(0, 0)
            self._timer.start()
        self._checkCanApply()

    def _showDone(self, ok: bool) -> None:
        self.ui.progressBar.format = "%p%"
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.setValue(1 if ok else 0)

    def _onSegmentationFinished(self, result: RunResult) -> None:
        self._showDone(result.status is RunStatus.succeeded)
        self.ui.statusLabel.text = result.message
        self.ui.timeLabel.text = _("{seconds:.1f} s").format(seconds=result.seconds)
        self._log(f"{result.status.value}: {result.message} ({result.seconds:.1f} s)")
        if result.status is RunStatus.failed:
            slicer.util.errorDisplay(result.message, detailedText=self.ui.logTextEdit.toPlainText())
        self._checkCanApply()

    def onShow3DButton(self) -> None:
        """Build the closed surfaces of the output segmentation so it shows in the 3D view."""
        output = self._parameterNode.outputSegmentation if self._parameterNode else None
        if output is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to show the segments in 3D."), waitCursor=True):
            output.CreateClosedSurfaceRepresentation()
            self.ui.statusLabel.text = _("Segments shown in 3D")

    def onCancelButton(self) -> None:
        if self.installer.isRunning():
            self.installer.cancel()
            self._showDone(False)
            self.ui.statusLabel.text = _("Installation cancelled")
            self._log(_("Installation cancelled; packages installed so far stay."))
        self.logic.segmentation.cancel()
        self._checkCanApply()

    # ------------------------------------------------------------------ train
    def _trainingPairs(self) -> list[TrainingPair]:
        """The training pairs whose nodes are still in the scene."""
        pairs = []
        for volumeId, segmentationId in self._trainingPairIds:
            volume, segmentation = slicer.mrmlScene.GetNodeByID(volumeId), slicer.mrmlScene.GetNodeByID(segmentationId)
            if volume is not None and segmentation is not None:
                pairs.append(TrainingPair(volume, segmentation))
        return pairs

    def onAddPairButton(self) -> None:
        parameterNode = self._parameterNode
        volume, segmentation = parameterNode.trainVolume, parameterNode.trainSegmentation
        if volume is None or segmentation is None:
            return
        pair = (volume.GetID(), segmentation.GetID())
        if pair not in self._trainingPairIds:
            self._trainingPairIds.append(pair)
        self._refreshTrainingLists()

    def onRemovePairButton(self) -> None:
        row = self.ui.trainPairsList.currentRow
        pairs = self._trainingPairs()
        if 0 <= row < len(pairs):
            removed = pairs[row]
            self._trainingPairIds.remove((removed.volumeNode.GetID(), removed.segmentationNode.GetID()))
        self._refreshTrainingLists()

    def _refreshTrainingLists(self) -> None:
        """Show the pairs and the segment names they hold (ticked unless the user unticked them)."""
        pairs = self._trainingPairs()
        self.ui.trainPairsList.clear()
        for pair in pairs:
            self.ui.trainPairsList.addItem(pair.describe())
        names: list[str] = []
        for pair in pairs:
            names += [name for name in segmentNames(pair.segmentationNode) if name not in names]
        self.ui.trainSegmentsList.blockSignals(True)
        self.ui.trainSegmentsList.clear()
        for name in names:
            item = qt.QListWidgetItem(name)
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            item.setCheckState(qt.Qt.Unchecked if name in self._uncheckedSegments else qt.Qt.Checked)
            self.ui.trainSegmentsList.addItem(item)
        self.ui.trainSegmentsList.blockSignals(False)
        self._checkCanTrain()

    def _onTrainSegmentTicked(self, item) -> None:
        if item.checkState() == qt.Qt.Checked:
            self._uncheckedSegments.discard(item.text())
        else:
            self._uncheckedSegments.add(item.text())
        self._checkCanTrain()

    def _chosenSegments(self) -> list[str]:
        listWidget = self.ui.trainSegmentsList
        items = [listWidget.item(row) for row in range(listWidget.count)]
        return [item.text() for item in items if item.checkState() == qt.Qt.Checked]

    def _trainingSettings(self) -> TrainingSettings:
        parameterNode = self._parameterNode
        output = _pathOrNone(parameterNode.trainOutputPath)
        if output is None:
            output = modelsFolder() / f"model-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
        return TrainingSettings(output, parameterNode.trainBase, _pathOrNone(parameterNode.trainBasePath),
                                parameterNode.trainPlane, float(parameterNode.trainMinutes), parameterNode.trainDevice)

    def _checkCanTrain(self) -> None:
        parameterNode = self._parameterNode
        reasons = []
        if self._busy():
            reasons.append(_("a run, a training or an installation is in progress"))
        if not self._trainingPairs():
            reasons.append(_("add at least one training pair"))
        elif not self._chosenSegments():
            reasons.append(_("tick at least one segment to learn"))
        if parameterNode and parameterNode.trainBase is not TrainingBase.scratch:
            basePath = _pathOrNone(parameterNode.trainBasePath)
            if basePath is None and parameterNode.trainBase is TrainingBase.sam2:
                remembered = qt.QSettings().value(SETTINGS_SAM2_CHECKPOINT, "")
                if remembered and Path(remembered).is_file():
                    parameterNode.trainBasePath = basePath = Path(remembered)  # observers run this again
            if basePath is None or not basePath.is_file():
                reasons.append(_("choose the checkpoint or model to start from"))
        offered = offeredDevices(ModelRoute.torch, self._deviceReport)  # training always runs on PyTorch
        self._showDeviceChoices(self.ui.trainDeviceComboBox, offered)
        if parameterNode and parameterNode.trainDevice not in offered:
            reasons.append(_("{device} is not available here (see Device)").format(
                device=parameterNode.trainDevice.label()))
        self.ui.trainButton.enabled = not reasons
        self.ui.trainCancelButton.enabled = self.logic.training.isRunning()
        self.ui.addPairButton.enabled = bool(parameterNode and parameterNode.trainVolume and parameterNode.trainSegmentation)
        self.ui.trainReasonLabel.text = "" if not reasons else _("Train is unavailable: {reasons}.").format(
            reasons="; ".join(reasons))

    def onTrainButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to prepare the dependencies.")):
            if not self._ensureDependencies(then=self._startTraining, route=ModelRoute.torch, training=True):
                return
        self._startTraining()

    def _startTraining(self) -> None:
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the training."), waitCursor=True):
            settings = self._trainingSettings()
            self.logic.training.start(self._trainingPairs(), self._chosenSegments(), settings)
            if settings.base is TrainingBase.sam2:
                qt.QSettings().setValue(SETTINGS_SAM2_CHECKPOINT, str(settings.basePath))
            self.ui.trainStatusLabel.text = _("Exported the pairs; starting the training...")
            self.ui.trainProgressBar.setRange(0, 0)  # busy until the first step
            self._timer.start()
        self._checkCanApply()

    def _onTrainingProgress(self, progress: TrainingProgress) -> None:
        if progress.remainingSeconds is None:
            return
        self.ui.trainProgressBar.setRange(0, 1000)
        self.ui.trainProgressBar.setValue(int(1000 * progress.fraction()))
        parts = [_("step {step}").format(step=progress.step)]
        if progress.loss is not None:
            parts.append(_("loss {loss:.3f}").format(loss=progress.loss))
        if progress.dice is not None:
            parts.append(_("validation Dice {dice:.3f}").format(dice=progress.dice))
        parts.append(_("about {minutes:.1f} min left").format(minutes=progress.remainingSeconds / 60))
        self.ui.trainStatusLabel.text = _("Training: ") + ", ".join(parts)

    def _onTrainingFinished(self, result: TrainingResult) -> None:
        succeeded = result.status is RunStatus.succeeded
        self.ui.trainProgressBar.setRange(0, 1)
        self.ui.trainProgressBar.setValue(1 if succeeded else 0)
        self.ui.trainStatusLabel.text = result.message
        self._log(f"{result.status.value}: {result.message} ({result.seconds:.0f} s)")
        if succeeded:  # the Segment section's model (and its history) from now on
            self._parameterNode.checkpointPath = result.modelPath
            self._parameterNode.sliceAxis = SliceAxis.model
        elif result.status is RunStatus.failed:
            slicer.util.errorDisplay(result.message, detailedText=self.ui.logTextEdit.toPlainText())
        self._checkCanApply()

    def onTrainCancelButton(self) -> None:
        self.logic.training.cancel()
        self._checkCanApply()

    # ------------------------------------------------------------------ dependencies
    def onInstallButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the dependencies.")):
            if self._ensureDependencies(then=None):
                slicer.util.infoDisplay(_("All dependencies are already installed."))

    def _ensureDependencies(self, then, route: Optional[ModelRoute] = None, training: bool = False) -> bool:
        """True when everything is installed; else asks, installs in the background and calls
        ``then`` afterwards (if given). Returns False whenever ``then`` is not called now.
        ``route``: the packages of that route (default: the chosen model's); ``training``: also
        MONAI (the training's data pipeline), which the PyTorch route otherwise installs only
        for keeping the largest component."""
        core, wheelhouse = resolvePackageSource(self.ui.coreSourceLineEdit.text, MODULE_DIR)  # ValueError: shown
        keepLargest = training or bool(self._parameterNode and self._parameterNode.keepLargestComponent)
        outcome = self.installer.ensure(core, self._confirmInstall, self._installTorch, self._log,
                                        lambda ok, message: self._onInstallDone(ok, message, then), route or self._route(),
                                        wheelhouse, keepLargest)
        if outcome is EnsureOutcome.needPyTorchExtension:
            found = installedVersions().get("torch")
            slicer.util.errorDisplay(_(
                "SAM2-UNet needs PyTorch {requirement}{found}. Install the 'PyTorch' extension with the "
                "Extensions Manager, restart Slicer, then press Segment again.").format(
                    requirement=TORCH_REQUIREMENT,
                    found=_(" (PyTorch {version} is installed)").format(version=found) if found else ""))
        elif outcome is EnsureOutcome.installing:
            self.ui.statusLabel.text = _("Installing Python packages...")
            self.ui.progressBar.setRange(0, 0)  # busy: pip gives no overall progress
            self._timer.start()
            self._checkCanApply()
        return outcome is EnsureOutcome.ready

    def _confirmInstall(self, planText: str) -> bool:
        self.ui.logTextEdit.clear()
        return slicer.util.confirmOkCancelDisplay(
            _("SAM2-UNet needs these Python packages, which will be installed into Slicer's Python "
              "(Slicer's own numpy, SimpleITK, pydicom and pillow are kept):\n{plan}\n\nThis may take "
              "several minutes.").format(plan=planText),
            windowTitle=_("Install SAM2-UNet dependencies"))

    def _installTorch(self) -> None:
        """Blocking: PyTorchUtils offers no background install."""
        self.ui.statusLabel.text = _("Installing PyTorch through the PyTorch extension...")
        slicer.app.processEvents()
        import PyTorchUtils

        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                  torchVersionRequirement=TORCH_REQUIREMENT)
        finally:
            slicer.app.restoreOverrideCursor()
        if torch is None:
            raise RuntimeError(_("PyTorch was not installed; see the application log."))

    def _onInstallDone(self, ok: bool, message: str, then) -> None:
        self._showDone(ok)
        self.ui.statusLabel.text = message.splitlines()[0]
        self._log(message)
        self._checkCanApply()
        self._updatePackageStatus()
        if not ok:
            slicer.util.errorDisplay(_("Installing the dependencies failed: {reason}. pip's full output "
                                       "is below and in the Log.").format(reason=message.splitlines()[-1]),
                                     detailedText=self.ui.logTextEdit.toPlainText())
            return
        self._shownCheckpoint = self._sliceLimitsFor = _UNSET  # now readable with sam2unet_core
        self._onParameterNodeModified()
        self.probeDevices()
        if then is not None:
            then()


#
# Logic
#


class SAM2UNetSlicerLogic(ScriptedLoadableModuleLogic):
    """Holds the parameter node and a ``SegmentationLogic`` bound to Slicer's modules.

    Scripting: ``SAM2UNetSlicerLogic().segmentation.runAndWait(volume, None, RunParameters(path))``;
    ``SAM2UNetSlicerLogic().training.runAndWait([TrainingPair(volume, segmentation)], ["liver"],
    TrainingSettings(Path("liver.safetensors")))``. ``worker`` keeps the model loaded between
    runs (``SAM2UNetSlicerLib.WarmWorker``).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner = SubprocessRunner()
        self.worker = WarmPredictRunner()
        self.segmentation = SegmentationLogic(slicer, vtk, self.runner, predictRunner=self.worker)
        self.training = TrainingLogic(slicer, vtk, SubprocessRunner())

    def getParameterNode(self):
        return SAM2UNetSlicerParameterNode(super().getParameterNode())


#
# Test
#


def selfTestVariant(isImportable: Callable[[str], bool]) -> tuple[Optional[str], str]:
    """Which self-test this Slicer's Python can run: ``("torch", "")`` with sam2unet_core,
    torch and sam2; ``("onnx", "")`` with sam2unet_core and onnxruntime (an install without
    PyTorch); else ``(None, what is missing)``."""
    if not isImportable("sam2unet_core"):
        return None, "sam2unet_core"
    if isImportable("torch") and isImportable("sam2"):
        return "torch", ""
    if isImportable("onnxruntime"):
        return "onnx", ""
    return None, "torch and sam2 (PyTorch models) or onnxruntime (ONNX models)"


class SAM2UNetSlicerTest(ScriptedLoadableModuleTest):
    """Self-test in a real Slicer (Reload & Test, or ctest py_SAM2UNetSlicer): MRHead through a
    tiny model of the installed route.

    With PyTorch: a tiny random hiera_t ``.safetensors``. Without PyTorch (ONNX route): the
    threshold graph ``Resources/Testing/selftest_threshold.onnx`` (not a trained network; it
    drives the module's ONNX route). Missing dependencies are reported, not failed: Slicer's
    ``runTest`` does not honour ``skipTest``. MRHead comes through SampleData (downloaded once,
    then cached); the temporary folder of the test model is removed at the end.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        variant, missing = selfTestVariant(lambda name: importlib.util.find_spec(name) is not None)
        if variant is None:
            message = _("SAM2-UNet self-test was not run: {missing} is not installed in Slicer's Python. "
                        "Press Segment, or Advanced > Install dependencies, then Reload & Test again.").format(
                            missing=missing)
            logging.warning(message)
            self.delayDisplay(message)
            return
        tempDir = Path(tempfile.mkdtemp(prefix="SAM2UNetSlicerTest-"))
        try:
            self._model, self._segmentNames = self._tinyModel(variant, tempDir)
            self.setUp()
            self.test_segments_MRHead_into_named_coloured_segments()
            self.setUp()
            self.test_cancel_leaves_the_scene_as_it_was()
        finally:
            shutil.rmtree(tempDir, ignore_errors=True)

    def _tinyModel(self, variant: str, folder: Path) -> tuple[Path, list[str]]:
        """The model file of ``variant`` and the segment names it gives."""
        if variant == "onnx":
            return Path(self._resources()) / "Testing" / "selftest_threshold.onnx", ["bright tissue"]
        import sam2unet_core
        from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

        architecture = Architecture(backbone="hiera_t", num_classes=3, in_channels=3, freeze_encoder=False)
        metadata = ModelMetadata(architecture=architecture, labels=default_labels(3, ["brain", "skin"]),
                                 input_size=64, intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5},
                                 mean=[], std=[])
        model = sam2unet_core.SAM2UNet(backbone="hiera_t", num_classes=3, in_channels=3, freeze_encoder=False)
        return sam2unet_core.save_model(model, folder / "tiny.safetensors", metadata), ["brain", "skin"]

    @staticmethod
    def _resources() -> str:
        return str(MODULE_DIR / "Resources")

    def _mrHead(self):
        import SampleData

        return SampleData.SampleDataLogic().downloadMRHead()

    def test_segments_MRHead_into_named_coloured_segments(self):
        volume = self._mrHead()
        logic = SAM2UNetSlicerLogic()
        params = RunParameters(self._model, Device.cpu, SliceAxis.axial, (60, 63))
        result = logic.segmentation.runAndWait(volume, None, params, idle=slicer.app.processEvents, timeoutSeconds=300)
        self.assertEqual(result.status, RunStatus.succeeded, result.message)
        segmentationNode = result.segmentationNode
        self.assertEqual(segmentationNode.GetName(), "MRHead segmentation")
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual([segmentation.GetSegment(i).GetName() for i in result.segmentIds], self._segmentNames)
        self.assertEqual(len(result.segmentIds), segmentation.GetNumberOfSegments())
        for segmentId in result.segmentIds:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume)
            self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)  # KJI, on the input grid
        self.delayDisplay(f"Segmented in {result.seconds:.1f} s with {self._model.name}")

    def test_cancel_leaves_the_scene_as_it_was(self):
        volume = self._mrHead()
        nodeIdsBefore = {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}
        logic = SAM2UNetSlicerLogic()
        params = RunParameters(self._model, Device.cpu, SliceAxis.axial, None)
        result = logic.segmentation.runAndWait(volume, None, params, idle=slicer.app.processEvents,
                                                cancelAfterSeconds=0.5)
        self.assertEqual(result.status, RunStatus.cancelled)
        nodeIdsAfter = {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}
        self.assertEqual(nodeIdsAfter, nodeIdsBefore)
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByName("MRHead segmentation"))
        logging.info("Cancel test passed")
