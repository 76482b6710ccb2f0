"""``sam2unet-predict`` end to end with a tiny real SAM2-UNet checkpoint: nnU-Net naming,
exact output geometry, bad files that do not stop the batch, resume after a killed run,
parts, DICOM in / DICOM SEG and seg.nrrd out, JSON-lines progress and the summary."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.data import get_testdata_file
from scipy.spatial.transform import Rotation

from sam2unet_core.cli.predict import main
from sam2unet_core.io.atomic import HOST_TAG
from sam2unet_core.io.cases import find_cases, select_part

REPO = Path(__file__).resolve().parents[1]
CT_SERIES = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
EVENTS = {"start", "case_start", "slices", "case_done", "case_skipped", "case_error", "done"}


@pytest.fixture(scope="module")
def checkpoint(grey_ct_checkpoint: Path) -> Path:
    return grey_ct_checkpoint


def write_nifti(path: Path, shape_ijk: tuple[int, int, int], degrees: float, seed: int) -> None:
    data = np.random.default_rng(seed).normal(40, 200, shape_ijk).astype(np.int16)
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("zx", [degrees, degrees / 2], degrees=True).as_matrix() \
        @ np.diag([0.9, 1.1, 3.0])
    affine[:3, 3] = [-20.0, 15.0, 40.0]
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two NIfTI cases (one oblique), an extra-channel file, a broken file, a 4D file, a
    real DICOM series folder and a grey PNG frame."""
    folder = tmp_path_factory.mktemp("inputs")
    write_nifti(folder / "caseA_0000.nii.gz", (20, 24, 4), degrees=25, seed=0)
    write_nifti(folder / "caseB_0000.nii.gz", (16, 18, 3), degrees=0, seed=1)
    write_nifti(folder / "caseB_0001.nii.gz", (16, 18, 3), degrees=0, seed=2)
    (folder / "broken_0000.nii.gz").write_bytes(b"this is not a NIfTI file")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)),
             folder / "fourd_0000.nii.gz")
    shutil.copytree(CT_SERIES, folder / "ctseries")
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (24, 20), dtype=np.uint8)).save(
        folder / "frame.png")
    return folder


def pid_of_a_finished_process() -> int:
    """The PID of a process that has ended: what a killed run's temporary files carry."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[dict]]:
    code = main(argv + ["--device", "cpu", "--progress", "jsonl"])
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]
    assert {e["event"] for e in events} <= EVENTS
    return code, events


def assert_same_geometry(output: Path, reference: sitk.Image) -> None:
    image = sitk.ReadImage(str(output))
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5)
    assert image.GetPixelID() == sitk.sitkUInt8


def test_folder_run_names_outputs_keeps_geometry_and_survives_bad_files(
    checkpoint: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    code, events = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint)], capsys)
    assert code == 1  # two bad files, reported at the end

    assert events[0] == {"event": "start", "cases": 6}
    assert events[-1] == {"event": "done", "ok": 4, "failed": 2, "skipped": 0}
    errors = {e["case"]: e["error"] for e in events if e["event"] == "case_error"}
    assert set(errors) == {"broken", "fourd"}
    assert "broken_0000.nii.gz" in errors["broken"] and "not a readable NIfTI" in errors["broken"]
    assert "fourd_0000.nii.gz" in errors["fourd"] and "expected a 3D volume" in errors["fourd"]
    done = {e["case"]: e for e in events if e["event"] == "case_done"}
    assert set(done) == {"caseA", "caseB", "ctseries", "frame"}
    assert set(done["caseA"]["timings"]) == {"read", "preprocess", "model", "postprocess", "write"}
    slices = [e for e in events if e["event"] == "slices" and e["case"] == "caseA"]
    assert slices[-1] == {"event": "slices", "case": "caseA", "done": 4, "total": 4}

    assert sorted(p.name for p in out.iterdir()) == [
        "caseA.nii.gz", "caseB.nii.gz", "ctseries.nii.gz", "frame.png", "predict_summary.json"]
    for case in ("caseA", "caseB"):
        assert_same_geometry(out / f"{case}.nii.gz", sitk.ReadImage(str(inputs / f"{case}_0000.nii.gz")))
        np.testing.assert_allclose(nib.load(out / f"{case}.nii.gz").affine,
                                   nib.load(inputs / f"{case}_0000.nii.gz").affine, atol=1e-4)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(inputs / "ctseries")))
    assert_same_geometry(out / "ctseries.nii.gz", reader.Execute())
    labels = np.asanyarray(nib.load(out / "caseA.nii.gz").dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert np.asarray(Image.open(out / "frame.png")).shape == (24, 20)

    summary = json.loads((out / "predict_summary.json").read_text())
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (4, 2, 0)
    by_case = {c["case"]: c for c in summary["cases"]}
    assert by_case["broken"]["status"] == "failed" and by_case["caseA"]["status"] == "ok"
    assert by_case["ctseries"]["series_uid"].startswith("1.3.6.1.4.1.5962")
    assert summary["arguments"]["model"] == str(checkpoint)
    assert summary["labels"] == {"1": "liver", "2": "spleen"}


def test_killed_run_resumes_and_skips_finished_cases(
    checkpoint: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Kill the CLI (SIGKILL) right after its first finished case, then rerun: the rerun
    finishes the batch, leaves the finished case untouched (same mtime) and removes the
    half-written files the killed run left."""
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("caseA_0000.nii.gz", "caseB_0000.nii.gz"):
        shutil.copy(inputs / name, cases / name)
    shutil.copy(inputs / "caseB_0000.nii.gz", cases / "caseC_0000.nii.gz")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sam2unet_core.cli.predict", "-i", str(cases), "-o",
               str(out), "-m", str(checkpoint), "--device", "cpu", "--progress", "jsonl"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in process.stdout:
            if json.loads(line)["event"] == "case_done":
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert (out / "caseA.nii.gz").exists() and not (out / "caseC.nii.gz").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("case*.nii.gz")}
    dead = pid_of_a_finished_process()
    stale = [out / f".partial-{dead}-caseB.nii.gz", out / f".partial-{dead}-{HOST_TAG}-caseA.nii.gz",
             out / f".partial-{dead}-predict_summary.json"]
    for path in stale:  # what a kill during a write leaves
        path.write_bytes(b"half a file from the killed run")
    unrelated = out / ".partial-99996-notes.txt"
    unrelated.write_text("not an output of this run")

    code, events = run(["-i", str(cases), "-o", str(out), "-m", str(checkpoint)], capsys)
    assert code == 0
    assert events[-1] == {"event": "done", "ok": 3 - len(finished), "failed": 0,
                          "skipped": len(finished)}
    done = [e["case"] for e in events if e["event"] == "case_done"]
    assert sorted(done + [name.split(".")[0] for name in finished]) == ["caseA", "caseB", "caseC"]
    skipped = [e["case"] for e in events if e["event"] == "case_skipped"]
    assert sorted(skipped) == sorted(name.split(".")[0] for name in finished)
    for name, mtime in finished.items():  # nothing finished was redone
        assert (out / name).stat().st_mtime_ns == mtime
    assert not any(path.exists() for path in stale) and unrelated.exists()
    for case in ("caseA", "caseB", "caseC"):  # every output complete and on its input's grid
        assert_same_geometry(out / f"{case}.nii.gz", sitk.ReadImage(str(cases / f"{case}_0000.nii.gz")))
        assert np.asanyarray(nib.load(out / f"{case}.nii.gz").dataobj).shape == nib.load(
            cases / f"{case}_0000.nii.gz").shape


def test_dicom_series_to_dicom_seg_and_seg_nrrd(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, events = run(["-i", str(CT_SERIES), "-o", str(tmp_path), "-m", str(checkpoint),
                        "--format", "dcm", "--slice-range", "1:4"], capsys)
    assert code == 0
    assert [e["slices"] for e in events if e["event"] == "case_start"] == [3]
    seg = hd.seg.segread(tmp_path / "CT5N.dcm")
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["liver", "spleen"]
    files = sorted(CT_SERIES.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    masks = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    assert masks.shape == (5, 16, 16)
    assert not masks[0].any() and not masks[4].any()  # outside the slice range

    code, _ = run(["-i", str(CT_SERIES), "-o", str(tmp_path), "-m", str(checkpoint),
                   "--format", "seg.nrrd", "--postprocess", "largest_component"], capsys)
    image = sitk.ReadImage(str(tmp_path / "CT5N.seg.nrrd"))
    assert image.GetMetaData("Segment0_Name") == "liver"
    assert image.GetMetaData("Segment1_Name") == "spleen"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CT_SERIES)))
    assert_same_geometry(tmp_path / "CT5N.seg.nrrd", reader.Execute())


def test_dicom_seg_for_nifti_input_is_a_clear_case_error(
    checkpoint: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, events = run(["-i", str(inputs / "caseB_0000.nii.gz"), "-o", str(tmp_path), "-m",
                        str(checkpoint), "--format", "dcm"], capsys)
    assert code == 1
    error = next(e for e in events if e["event"] == "case_error")
    assert "caseB_0000.nii.gz" in error["error"] and "needs DICOM input" in error["error"]
    assert list(tmp_path.glob("*.dcm")) == []


def test_parts_split_the_cases_and_overwrite_redoes_finished_ones(
    checkpoint: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cases = find_cases(inputs)
    assert [c.name for c in cases] == ["broken", "caseA", "caseB", "ctseries", "fourd", "frame"]
    parts = [select_part(cases, 3, k) for k in range(3)]
    assert sorted(c.name for part in parts for c in part) == [c.name for c in cases]
    code, events = run(["-i", str(inputs), "-o", str(tmp_path), "-m", str(checkpoint),
                        "--num-parts", "3", "--part-id", "2", "--save-probabilities"], capsys)
    assert code == 0
    assert events[0] == {"event": "start", "cases": 2}
    assert sorted(p.name for p in tmp_path.glob("*.*")) == [
        "caseB.nii.gz", "frame.png", "predict_summary_part2_of_3.json"]
    probabilities = nib.load(tmp_path / "probabilities" / "frame.nii.gz")
    assert probabilities.shape == (20, 24, 1, 3)  # (I, J, K, classes)

    frame = ["-i", str(inputs / "frame.png"), "-o", str(tmp_path), "-m", str(checkpoint)]
    _, events = run(frame + ["--save-probabilities"], capsys)
    assert events[-1] == {"event": "done", "ok": 0, "failed": 0, "skipped": 1}
    _, events = run(frame, capsys)  # probabilities not asked for: the label file suffices
    assert events[-1] == {"event": "done", "ok": 0, "failed": 0, "skipped": 1}
    _, events = run(frame + ["--overwrite"], capsys)
    assert events[-1] == {"event": "done", "ok": 1, "failed": 0, "skipped": 0}


def test_bad_arguments_and_checkpoints_fail_before_any_work(
    checkpoint: Path, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["-i", str(tmp_path / "absent"), "-o", str(tmp_path), "-m", str(checkpoint)])
    assert info.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-i", str(inputs), "-o", str(tmp_path), "-m", str(checkpoint),
              "--num-parts", "2", "--part-id", "2"])
    with pytest.raises(SystemExit):
        main(["-i", str(inputs), "-o", str(tmp_path), "-m", str(checkpoint),
              "--slice-range", "5"])
    with pytest.raises(SystemExit):
        main(["-i", str(inputs), "-o", str(inputs), "-m", str(checkpoint)])
    assert "must differ from the input folder" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["-i", str(inputs), "-o", str(tmp_path / "o"), "-m", str(bad),
                 "--device", "cpu"]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert main(["-i", str(inputs), "-o", str(tmp_path / "o"), "-m", str(checkpoint),
                 "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_list_series_prints_every_series(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["-i", str(CT_SERIES.parent), "-o", str(tmp_path), "--list-series"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "Scout" in lines[1] and "5 files" in lines[0]
    assert main(["-i", str(tmp_path), "-o", str(tmp_path), "--list-series"]) == 1


def test_real_nifti_volumes_nobody_here_made_keep_their_geometry(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """nibabel's bundled anatomical scans (LAS big-endian int16, RAS float), sliced
    sagittally over a few slices: outputs match the inputs for SimpleITK and nibabel."""
    data = Path(nib.__file__).parent / "tests" / "data"
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("anatomical.nii", "reoriented_anat_moved.nii"):
        shutil.copy(data / name, cases / name)
    code, events = run(["-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(checkpoint),
                        "--axis", "sagittal", "--slice-range", "5:8", "--format", "nii"],
                       capsys)
    assert code == 0 and events[-1]["ok"] == 2
    assert [e["slices"] for e in events if e["event"] == "case_start"] == [3, 3]
    for name in ("anatomical", "reoriented_anat_moved"):
        source, output = cases / f"{name}.nii", tmp_path / "out" / f"{name}.nii"
        assert_same_geometry(output, sitk.ReadImage(str(source)))
        np.testing.assert_allclose(nib.load(output).affine, nib.load(source).affine, atol=1e-4)
        labels = np.asanyarray(nib.load(output).dataobj)  # (I, J, K); sagittal = along i here
        assert not labels[:5].any() and not labels[8:].any()


def test_frames_are_batched_and_a_bad_frame_fails_alone(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for index, size in enumerate([(20, 30), (31, 17), (40, 40)]):
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(frames / f"f{index}.png")
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(frames / "rgb.jpg")
    code, events = run(["-i", str(frames), "-o", str(tmp_path / "out"), "-m", str(checkpoint),
                        "--batch-size", "4"], capsys)
    assert code == 1
    assert events[-1] == {"event": "done", "ok": 3, "failed": 1, "skipped": 0}
    error = next(e for e in events if e["event"] == "case_error")
    assert error["case"] == "rgb" and "colour images have 3 channels" in error["error"]
    # the shared batch failed and each frame ran again alone: still one case_start per frame
    assert [e["case"] for e in events if e["event"] == "case_start"] == ["f0", "f1", "f2", "rgb"]
    for index, size in enumerate([(20, 30), (31, 17), (40, 40)]):
        assert np.asarray(Image.open(tmp_path / "out" / f"f{index}.png")).shape == size


def test_the_folder_is_walked_once_and_its_warnings_logged_once(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """The CLI checks its arguments with the case list (select_cases) and hands that list
    to predict_from_files, which does not look for the cases again."""
    cases = tmp_path / "cases"
    cases.mkdir()
    write_nifti(cases / "one_0000.nii.gz", (12, 10, 2), degrees=0, seed=4)
    write_nifti(cases / "one_0001.nii.gz", (12, 10, 2), degrees=0, seed=5)
    with caplog.at_level(logging.WARNING, logger="sam2unet_core.io.cases"):
        code, events = run(["-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(checkpoint)], capsys)
    assert code == 0 and events[-1] == {"event": "done", "ok": 1, "failed": 0, "skipped": 0}
    assert [r.getMessage() for r in caplog.records].count(
        f"{cases}: ignoring extra channel files one_0001.nii.gz; these models read one image per case "
        "(the _0000 file)") == 1


class _GpuOutOfMemory(RuntimeError):
    """Stands for ``torch.cuda.OutOfMemoryError`` (known by its class name, as the batch
    knows it without importing torch)."""


_GpuOutOfMemory.__name__ = "OutOfMemoryError"


def test_gpu_out_of_memory_is_recorded_as_such_and_worded_with_the_batch_size_flag(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from sam2unet_core import load_model
    from sam2unet_core.inference.engine import Predictor

    class FullGpu:
        def __init__(self, model) -> None:
            self.metadata, self.description = model.metadata, "a full GPU"

        def submit(self, *args, **kwargs):
            raise _GpuOutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")

    image = tmp_path / "case_0000.nii.gz"
    write_nifti(image, (12, 10, 2), degrees=0, seed=6)
    code = main(["-i", str(image), "-o", str(tmp_path / "out"), "-m", str(checkpoint), "--batch-size", "6",
                 "--progress", "jsonl"],
                build_predictor=lambda args: Predictor(FullGpu(load_model(args.model)), batch_size=args.batch_size))
    captured = capsys.readouterr()
    [error] = [json.loads(line) for line in captured.out.splitlines() if '"case_error"' in line]
    assert code == 1 and (error["kind"], error["field"], error["value"]) == ("out_of_memory", "batch_size", 3)
    assert error["error"].endswith("CUDA out of memory. Tried to allocate 2.00 GiB; GPU out of memory: try a "
                                   "batch size of 3 (--batch-size 3)")
    assert "(--batch-size 3)" in captured.err.splitlines()[-1]
    [record] = json.loads((tmp_path / "out" / "predict_summary.json").read_text())["cases"]
    assert record["error"].endswith("try a batch size of 3") and record["kind"] == "out_of_memory"
