"""The background process runner with real child processes, the JSON-lines progress parser,
the CLI arguments and the device probe of SAM2UNetSlicer."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import slicer_fakes  # noqa: F401  (puts SAM2UNetSlicer/ on sys.path)
from SAM2UNetSlicerLib.DeviceProbe import DeviceReport, parseProbeOutput
from SAM2UNetSlicerLib.Parameters import (Device, Precision, RunParameters, SliceAxis, buildPredictArgs,
                                          processEnvironment, sliceCountAlongAxis)
from SAM2UNetSlicerLib.ProcessRunner import SubprocessRunner, parseProgressLine

posixOnly = pytest.mark.skipif(os.name == "nt", reason="checks process ids with os.kill(pid, 0)")


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.returnCodes: list[int] = []
        self.threads: set[int] = set()

    def onLine(self, line: str) -> None:
        self.threads.add(threading.get_ident())
        self.lines.append(line)

    def onFinished(self, returnCode: int) -> None:
        self.threads.add(threading.get_ident())
        self.returnCodes.append(returnCode)


def pythonArgs(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def pollUntil(runner: SubprocessRunner, condition, limitSeconds: float = 60.0) -> None:
    """Poll like Slicer's QTimer does until ``condition()``; the limit only guards a hang."""
    deadline = time.monotonic() + limitSeconds
    while not condition():
        runner.poll()
        if time.monotonic() > deadline:
            raise AssertionError("the child process did not get there")
        time.sleep(0.01)


def processExists(pid: int) -> bool:
    """True for a live process; a zombie (killed, not yet reaped by init) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def test_lines_and_return_code_arrive_in_order_on_the_polling_thread() -> None:
    runner, recorder = SubprocessRunner(), Recorder()
    runner.start(pythonArgs("""
        import os, sys
        print('{"event": "start", "cases": 1}')
        print("to stderr", file=sys.stderr)
        print("VAR=" + os.environ["SAM2UNET_TEST_VAR"])
        sys.exit(3)
    """), {**os.environ, "SAM2UNET_TEST_VAR": "é42"}, recorder.onLine, recorder.onFinished)
    assert runner.isRunning()
    pollUntil(runner, lambda: recorder.returnCodes)
    assert recorder.returnCodes == [3]
    assert recorder.lines[0] == '{"event": "start", "cases": 1}'
    assert set(recorder.lines) == {'{"event": "start", "cases": 1}', "to stderr", "VAR=é42"}  # stderr merged
    assert recorder.threads == {threading.get_ident()}
    assert not runner.isRunning() and not runner.poll()


def test_start_while_running_is_refused_and_cancel_is_idempotent() -> None:
    runner, recorder = SubprocessRunner(), Recorder()
    runner.start(pythonArgs("import time; time.sleep(60)"), None, recorder.onLine, recorder.onFinished)
    with pytest.raises(RuntimeError, match="already running"):
        runner.start(pythonArgs("pass"), None, recorder.onLine, recorder.onFinished)
    runner.cancel()
    runner.cancel()
    assert not runner.isRunning() and not runner.poll()
    assert recorder.returnCodes == []


@posixOnly
def test_cancel_kills_the_whole_process_tree() -> None:
    runner, recorder = SubprocessRunner(), Recorder()
    runner.start(pythonArgs("""
        import os, subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(f"pids {os.getpid()} {worker.pid}", flush=True)
        time.sleep(120)
    """), None, recorder.onLine, recorder.onFinished)
    pollUntil(runner, lambda: any(line.startswith("pids ") for line in recorder.lines))
    parent, worker = (int(value) for value in recorder.lines[-1].split()[1:])
    assert processExists(parent) and processExists(worker)
    runner.cancel()
    deadline = time.monotonic() + 30
    while processExists(worker) and time.monotonic() < deadline:  # the orphan is reaped by init
        time.sleep(0.05)
    assert not processExists(worker)
    assert not processExists(parent)
    assert recorder.returnCodes == []  # cancel does not report a finish
    assert not runner.isRunning()


def test_a_new_run_can_follow_a_cancelled_one() -> None:
    runner, recorder = SubprocessRunner(), Recorder()
    runner.start(pythonArgs("import time; time.sleep(60)"), None, recorder.onLine, recorder.onFinished)
    runner.cancel()
    runner.start(pythonArgs("print('second')"), None, recorder.onLine, recorder.onFinished)
    pollUntil(runner, lambda: recorder.returnCodes)
    assert recorder.lines == ["second"] and recorder.returnCodes == [0]


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ('{"event": "slices", "case": "a", "done": 3, "total": 9}', "slices"),
        ('  {"event": "done", "ok": 1, "failed": 0, "skipped": 0}  ', "done"),
        ("Predicting:  33%|###  | 3/9 [00:01<00:02, 2.9it/s]", None),
        ('{"event": 5}', None),
        ("[1, 2]", None),
        ('{"event": "slices", "done": ', None),
        ("", None),
    ],
)
def test_progress_parser_accepts_only_event_objects(line: str, event: str | None) -> None:
    parsed = parseProgressLine(line)
    assert (parsed.event if parsed else None) == event


def test_predict_arguments_without_slice_range_and_environment_untouched(tmp_path: Path) -> None:
    params = RunParameters(tmp_path / "m.safetensors", Device.mps, SliceAxis.sagittal)
    args = buildPredictArgs("python", tmp_path / "in.nrrd", tmp_path / "out", params)
    assert "--slice-range" not in args
    ranged = buildPredictArgs("python", tmp_path / "in.nrrd", tmp_path / "out",
                              RunParameters(tmp_path / "m.safetensors", sliceRange=(3, 5)))
    assert ranged[ranged.index("--slice-range") + 1] == "3:6"  # inclusive 3..5 -> half-open 3:6
    assert args[args.index("--axis") + 1] == "sagittal" and args[args.index("--device") + 1] == "mps"
    assert "--precision" not in args  # auto: the CLI's default
    forced = RunParameters(tmp_path / "m.safetensors", precision=Precision.fp32)
    fp32 = buildPredictArgs("python", tmp_path / "in.nrrd", tmp_path / "out", forced)
    assert fp32[fp32.index("--precision") + 1] == "fp32"
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}
    env = processEnvironment(base, Device.mps)
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["PYTHONUNBUFFERED"] == "1"
    assert base == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}
    assert processEnvironment(base, Device.cpu)["CUDA_VISIBLE_DEVICES"] == ""


def test_default_plane_is_the_models_and_passes_no_axis(tmp_path: Path) -> None:
    params = RunParameters(tmp_path / "m.safetensors")
    assert params.sliceAxis is SliceAxis.model and SliceAxis.model.label() == "Model's plane"
    assert "--axis" not in buildPredictArgs("python", tmp_path / "in.nrrd", tmp_path / "out", params)


def test_slice_count_follows_the_anatomical_axis_as_the_cli_counts_it() -> None:
    from sam2unet_core.io.orientation import plane_view

    dimensionsIjk = (256, 200, 40)
    axialAcquisition = np.diag([0.7, 0.7, 3.0, 1.0])
    assert sliceCountAlongAxis(axialAcquisition, dimensionsIjk, SliceAxis.axial, plane_view) == 40
    assert sliceCountAlongAxis(axialAcquisition, dimensionsIjk, SliceAxis.coronal, plane_view) == 200
    assert sliceCountAlongAxis(axialAcquisition, dimensionsIjk, SliceAxis.sagittal, plane_view) == 256
    # Sagittal acquisition: I runs anterior-posterior, J superior-inferior, K left-right.
    sagittalAcquisition = np.array([[0, 0, -1.0, 0], [-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    assert sliceCountAlongAxis(sagittalAcquisition, dimensionsIjk, SliceAxis.axial, plane_view) == 200
    assert sliceCountAlongAxis(sagittalAcquisition, dimensionsIjk, SliceAxis.sagittal, plane_view) == 40
    # Oblique by 20 degrees: still the closest voxel axis.
    oblique = slicer_fakes.obliqueIjkToRas(degrees=(20, 0, 0))
    assert sliceCountAlongAxis(oblique, dimensionsIjk, SliceAxis.axial, plane_view) == 40
    assert sliceCountAlongAxis(axialAcquisition, dimensionsIjk, SliceAxis.model, plane_view, "coronal") == 200


def test_probe_output_parsing_and_summaries() -> None:
    report = parseProbeOutput([
        "Warning: something noisy",
        '{"probe": "sam2unet-device-probe", "torch": "2.5.1+cu124", "cuda": ["NVIDIA A100 (80 GB)"], "mps": false, "error": ""}',
    ])
    assert report.summary() == "torch 2.5.1+cu124: CUDA NVIDIA A100 (80 GB), CPU"
    assert report.bestDevice() == "cuda"
    assert DeviceReport(torchVersion="2.5.1", mps=True).bestDevice() == "mps"
    failed = parseProbeOutput(["Traceback ...", "ImportError: libcudart.so.12"])
    assert failed.torchVersion == "" and "libcudart" in failed.summary()
    assert DeviceReport().summary() == "PyTorch not installed"


def test_device_probe_script_runs_in_a_child_process() -> None:
    import torch

    script = slicer_fakes.MODULE_DIR / "SAM2UNetSlicerLib" / "DeviceProbe.py"
    runner, recorder = SubprocessRunner(), Recorder()
    runner.start([sys.executable, str(script)], None, recorder.onLine, recorder.onFinished)
    pollUntil(runner, lambda: recorder.returnCodes, limitSeconds=120)
    assert recorder.returnCodes == [0]
    report = parseProbeOutput(recorder.lines)
    assert report.torchVersion == torch.__version__
    assert report.bestDevice() == ("cuda" if torch.cuda.is_available() else "mps" if report.mps else "cpu")


def test_onnx_probe_reports_the_execution_providers_without_importing_torch() -> None:
    """``DeviceProbe.py onnx`` in a child: ONNX Runtime's version and providers as this
    Python has them, and no torch in that child's modules."""
    import json
    import subprocess

    import onnxruntime

    script = slicer_fakes.MODULE_DIR / "SAM2UNetSlicerLib" / "DeviceProbe.py"
    runner, recorder = SubprocessRunner(), Recorder()
    runner.start([sys.executable, str(script), "onnx"], None, recorder.onLine, recorder.onFinished)
    pollUntil(runner, lambda: recorder.returnCodes, limitSeconds=120)
    assert recorder.returnCodes == [0]
    report = parseProbeOutput(recorder.lines, "onnx")
    assert report.runtime == "onnx" and report.onnxruntimeVersion == onnxruntime.__version__
    assert report.onnxProviders == onnxruntime.get_available_providers()
    assert report.hasCuda() is ("CUDAExecutionProvider" in onnxruntime.get_available_providers())
    code = (f"import sys, json; sys.path.insert(0, {str(script.parent)!r}); import DeviceProbe; "
            "DeviceProbe.main(['onnx']); print(json.dumps(sorted(m for m in ('torch', 'monai', 'sam2') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == []
    bad = subprocess.run([sys.executable, str(script), "tensorflow"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "tensorflow" in bad.stderr


def test_onnx_probe_summaries_and_device_choices() -> None:
    from SAM2UNetSlicerLib.InstallLogic import ModelRoute
    from SAM2UNetSlicerLib.Parameters import offeredDevices

    cpuOnly = DeviceReport(runtime="onnx", onnxruntimeVersion="1.20.1", onnxProviders=["CPUExecutionProvider"])
    gpu = DeviceReport(runtime="onnx", onnxruntimeVersion="1.20.1",
                       onnxProviders=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cpuOnly.summary() == "onnxruntime 1.20.1: CPU" and cpuOnly.bestDevice() == "cpu"
    assert gpu.summary() == "onnxruntime 1.20.1: CUDA, CPU" and gpu.bestDevice() == "cuda"
    assert DeviceReport(runtime="onnx").summary() == "ONNX Runtime not installed"
    failed = parseProbeOutput(["ImportError: libcublasLt.so.12"], "onnx")
    assert failed.runtime == "onnx" and "libcublasLt" in failed.summary()
    assert offeredDevices(ModelRoute.onnx, cpuOnly) == [Device.auto, Device.cpu]
    assert offeredDevices(ModelRoute.onnx, gpu) == [Device.auto, Device.cuda, Device.cpu]
    assert offeredDevices(ModelRoute.onnx, None) == [Device.auto, Device.cpu]  # not probed yet
    torchGpu = DeviceReport(torchVersion="2.5.1", cudaDevices=["A100"], mps=False)
    assert offeredDevices(ModelRoute.onnx, torchGpu) == [Device.auto, Device.cpu]  # torch's GPUs say nothing
    assert offeredDevices(ModelRoute.torch, torchGpu) == [Device.auto, Device.cuda, Device.cpu]
    assert offeredDevices(ModelRoute.torch, DeviceReport(torchVersion="2.5.1", mps=True)) == [Device.auto, Device.cpu, Device.mps]
    assert offeredDevices(ModelRoute.torch, gpu) == list(Device)  # no torch probe yet: the run checks


def test_onnx_run_parameters_refuse_apple_mps(tmp_path: Path) -> None:
    model = tmp_path / "organs.onnx"
    model.write_bytes(b"onnx")
    RunParameters(model, Device.cuda).validate()
    with pytest.raises(ValueError, match=r"Apple MPS is not available for ONNX models \(organs\.onnx\)"):
        RunParameters(model, Device.mps).validate()
    with pytest.raises(ValueError, match=r"organs\.onnx is an ONNX model, which runs at the precision"):
        RunParameters(model, Device.cpu, precision=Precision.bf16).validate()
    args = buildPredictArgs("/opt/Slicer/bin/PythonSlicer", tmp_path / "in.nrrd", tmp_path / "out", RunParameters(model, Device.cpu))
    assert args[args.index("-m", 3) + 1] == str(model) and args[args.index("--device") + 1] == "cpu"
