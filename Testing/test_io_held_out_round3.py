"""Held-out inputs, round 3 (issue 26), through the real ``sam2unet-predict`` CLI:

* file and folder names that are not valid UTF-8 (Linux names are bytes): read, written in
  every SimpleITK format, or refused with the reason, and never a process abort;
* a disk that fills during a write: no output under its final name, the case fails, a rerun
  after freeing space redoes it; an output that cannot be read is never skipped as done;
* DICOM slices with different rescale slopes/intercepts: HU as pydicom computes them;
* enhanced multi-frame DICOM: frames placed by their functional groups, several stacks refused;
* a second run on the same output folder leaves the first run's temporary files alone;
* ``--list-series`` without ``-o``, ``case_skipped`` events, SIGTERM, complex voxels,
  ``-o`` naming a file, and a NIfTI header nibabel refuses, each said once.

Small file systems are tmpfs mounts (needs root, as CI has; skipped with the reason elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import randomize_
from dicom_data import write_ct_series
from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.cli.predict import main
from sam2unet_core.io import read_volume
from sam2unet_core.io.atomic import HOST_TAG
from sam2unet_core.io.volume import Volume
from sam2unet_core.io.writers import write_labels
from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

REPO = Path(__file__).resolve().parents[1]
NOT_UTF8 = os.fsdecode(b"scan\xff\xfe")  # Python's name for the bytes b"scan\xff\xfe"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class grey-input hiera_t model with random weights, so its label maps vary."""
    meta = ModelMetadata(
        architecture=Architecture("hiera_t", num_classes=3, in_channels=1),
        labels=default_labels(3, ["liver", "spleen"]), input_size=32,
        intensity={"kind": "ct_window", "center": 40, "width": 400}, mean=[], std=[],
    )
    model = randomize_(SAM2UNet("hiera_t", num_classes=3, in_channels=1), seed=5).eval()
    return save_model(model, tmp_path_factory.mktemp("model") / "random.safetensors", meta)


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[dict], str]:
    """The CLI in this process: exit code, JSON-lines events, stderr."""
    code = main(argv + ["--device", "cpu", "--progress", "jsonl"])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def run_process(argv: list[str]) -> subprocess.CompletedProcess:
    """The CLI as its own process (a native abort would end only that process)."""
    return subprocess.run([sys.executable, "-m", "sam2unet_core.cli.predict", *argv, "--device",
                           "cpu", "--progress", "jsonl"], capture_output=True, cwd=REPO, timeout=300)


def ct_volume(path: Path, shape_ijk=(40, 36, 6), seed: int = 0) -> Path:
    """An oblique int16 CT-like volume written by SimpleITK (format from the ending)."""
    data = np.random.default_rng(seed).normal(40, 300, shape_ijk[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-20.0, 15.0, 40.0))
    image.SetDirection(sitk.VersorTransform((0.2, 0.1, 0.3), 0.4).GetMatrix())
    staging = Path(tempfile.mkdtemp())  # a UTF-8 folder for SimpleITK; moved from there
    ending = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    sitk.WriteImage(image, str(staging / f"image{ending}"))
    for written in staging.iterdir():  # a .nhdr header and its detached data file
        shutil.move(written, path if written.name.startswith("image") else path.parent / written.name)
    staging.rmdir()
    return path


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs mount; ``fill(disk, leave)`` leaves ``leave`` bytes free on it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    stats = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "ab") as stream:
        stream.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return filler


# --------------------------------------------------------------- 1. names that are not UTF-8
def test_names_that_are_not_utf8_are_read_and_written_in_every_simpleitk_format(
    checkpoint: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / NOT_UTF8  # the folder's name is not UTF-8 either
    inputs.mkdir()
    ct_volume(inputs / f"{NOT_UTF8}_0000.nrrd")
    ct_volume(inputs / f"{NOT_UTF8}b_0000.mha", seed=1)
    ct_volume(inputs / "plain_0000.nrrd", seed=2)
    ct_volume(inputs / f"{NOT_UTF8}c_0000.nhdr", seed=3)  # names its data file image.raw
    dicom = tmp_path / f"ct {NOT_UTF8}"
    write_ct_series(dicom, np.random.default_rng(4).integers(0, 2000, (4, 12, 10)).astype(np.uint16),
                    [(0, 0, 2.5 * k) for k in range(4)], rescale_intercept=-1024)
    for fmt in ("mha", "nrrd"):
        out = tmp_path / f"out {NOT_UTF8} {fmt}"
        done = run_process(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint), "--format", fmt])
        events = [json.loads(line) for line in done.stdout.splitlines()]
        assert done.returncode == 1, done.stderr.decode(errors="replace")  # the .nhdr alone fails
        assert events[-1]["event"] == "done" and (events[-1]["ok"], events[-1]["failed"]) == (3, 1)
        error = next(e["error"] for e in events if e["event"] == "case_error")
        assert "not valid UTF-8" in error and "rename" in error
        for name, source in ((NOT_UTF8, f"{NOT_UTF8}_0000.nrrd"), (f"{NOT_UTF8}b", f"{NOT_UTF8}b_0000.mha"),
                             ("plain", "plain_0000.nrrd")):
            labels, image = read_volume(out / f"{name}.{fmt}"), read_volume(inputs / source)
            assert labels.same_grid(image) and labels.array_kji.dtype.kind in "ui"
        assert not [p for p in out.iterdir() if p.name.startswith((".partial-", ".sitk-"))]
        listed = run_process(["-i", str(dicom), "-o", str(out / "dicom"), "-m", str(checkpoint),
                              "--format", fmt])
        assert listed.returncode == 0, listed.stderr.decode(errors="replace")
        assert read_volume(out / "dicom" / f"ct {NOT_UTF8}.{fmt}").same_grid(read_volume(dicom))


# ------------------------------------------------------------------------- 2. full disk
@pytest.mark.parametrize("fmt", ["mha", "nrrd"])
def test_at_every_fill_level_a_simpleitk_write_fails_or_reads_back_whole(
    small_disk: Path, fmt: str
) -> None:
    """ITK does not report every failed write (NRRD truncated to whole pages, seen here): the
    writer must never leave a file under the final name that differs from the labels."""
    labels = Volume(np.random.default_rng(0).integers(0, 3, (20, 64, 64)).astype(np.uint8))
    target = small_disk / f"labels.{fmt}"
    written = failed = 0
    for leave_kib in range(0, 40):
        filler = fill(small_disk, leave_kib * 1024)
        try:
            write_labels(labels, target)
        except (OSError, ValueError) as err:
            assert str(target) in str(err) or "disk full" in str(err) or "space" in str(err)
            assert not target.exists()
            failed += 1
        else:
            assert np.array_equal(read_volume(target).array_kji, labels.array_kji)
            written += 1
            target.unlink()
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
        filler.unlink()
    assert written and failed  # both sides of the boundary were crossed


def test_full_disk_mid_run_fails_the_case_and_a_rerun_after_freeing_space_redoes_it(
    checkpoint: Path, tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    ct_volume(inputs / "big_0000.nii.gz", shape_ijk=(96, 96, 12))
    out = small_disk / "out"
    out.mkdir()
    filler = fill(small_disk, 4096)  # room for the write test, not for the label map
    code, events, _ = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint),
                           "--format", "mha"], capsys)
    assert code == 1 and events[-1]["failed"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["predict_summary.json"]  # no label map,
    assert json.loads((out / "predict_summary.json").read_text())["failed"] == 1  # probe, temporary
    filler.unlink()
    code, events, _ = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint),
                           "--format", "mha"], capsys)
    assert code == 0 and [e["event"] for e in events].count("case_done") == 1
    assert read_volume(out / "big.mha").same_grid(read_volume(inputs / "big_0000.nii.gz"))


def test_an_output_that_cannot_be_read_is_redone_not_skipped(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("empty", "truncated", "whole"):
        ct_volume(inputs / f"{name}_0000.nrrd", seed=len(name))
    out = tmp_path / "out"
    code, _, _ = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint), "--format", "nrrd"],
                     capsys)
    assert code == 0
    whole = (out / "whole.nrrd").read_bytes()
    (out / "empty.nrrd").write_bytes(b"")  # what a full disk left with an older version
    (out / "truncated.nrrd").write_bytes((out / "truncated.nrrd").read_bytes()[:20])
    code, events, _ = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint),
                           "--format", "nrrd"], capsys)
    assert code == 0
    assert sorted(e["case"] for e in events if e["event"] == "case_done") == ["empty", "truncated"]
    assert [e["case"] for e in events if e["event"] == "case_skipped"] == ["whole"]
    assert "empty.nrrd cannot be read (the file is empty)" in caplog.text
    assert (out / "whole.nrrd").read_bytes() == whole
    for name in ("empty", "truncated"):
        assert read_volume(out / f"{name}.nrrd").same_grid(read_volume(inputs / f"{name}_0000.nrrd"))


def test_a_disk_full_before_the_run_leaves_no_write_test_file(
    checkpoint: Path, tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    ct_volume(inputs / "a_0000.nrrd")
    fill(small_disk, 0)
    code, _, err = run(["-i", str(inputs), "-o", str(small_disk), "-m", str(checkpoint)], capsys)
    assert code == 2 and "cannot write to the output folder" in err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# ----------------------------------------------------- 3. per-slice rescale of a DICOM series
def test_slices_with_different_rescale_read_as_pydicom_computes_hu_and_segment_the_same(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    series = tmp_path / "series"
    stored = np.random.default_rng(6).integers(0, 3000, (5, 24, 20)).astype(np.uint16)
    write_ct_series(series, stored, [(0, 0, 2.5 * k) for k in range(5)], spacing_ij=(0.7, 0.7))
    files = sorted(series.iterdir())
    for file, (slope, intercept) in zip(files, [(1, 0), (1, -1024), (2, -2048), (1, -1024), (1, 0)]):
        ds = pydicom.dcmread(file)  # the first slice: unsigned, slope 1, intercept 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.save_as(file)
    hu = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
                   for ds in (pydicom.dcmread(f) for f in files)])
    volume = read_volume(series)
    assert volume.array_kji.min() < 0 and np.array_equal(volume.array_kji, hu)
    np.testing.assert_allclose(volume.spacing_ijk, (0.7, 0.7, 2.5))

    plain = tmp_path / "plain"
    plain.mkdir()
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.int16), np.diag([-0.7, -0.7, 2.5, 1])),
             plain / "series_0000.nii.gz")  # the same voxels stored plainly (LPS -> RAS)
    for source, out in ((series, tmp_path / "out_dicom"), (plain, tmp_path / "out_plain")):
        code, _, _ = run(["-i", str(source), "-o", str(out), "-m", str(checkpoint), "--statistics"],
                         capsys)
        assert code == 0
    from_dicom = read_volume(tmp_path / "out_dicom" / "series.nii.gz")
    assert np.array_equal(from_dicom.array_kji, read_volume(tmp_path / "out_plain" / "series.nii.gz").array_kji)
    statistics = json.loads((tmp_path / "out_dicom" / "series.statistics.json").read_text())
    for record in statistics:
        mask = from_dicom.array_kji == record["label"]
        if mask.any():
            assert record["intensity_mean"] == pytest.approx(hu[mask].mean(), rel=1e-6)


# ----------------------------------------------------------- 4. enhanced multi-frame DICOM
def enhanced_ct(path: Path, tmp: Path, positions_k, echoes: int = 1, seed: int = 7) -> np.ndarray:
    """An enhanced (legacy converted) multi-frame CT from single slices at ``positions_k``
    (mm along z), its frames then stored in the order given; returns the HU in z order."""
    stored = np.random.default_rng(seed).integers(0, 2000, (len(positions_k), 16, 12)).astype(np.uint16)
    slices = tmp / f"slices-{path.parent.name}"
    write_ct_series(slices, stored, [(-10.0, 5.0, z) for z in positions_k], spacing_ij=(0.7, 0.6),
                    rescale_intercept=-1024, tags={"SliceThickness": 2.5})
    datasets = [pydicom.dcmread(f) for f in sorted(slices.iterdir())] * echoes
    for index, ds in enumerate(datasets):
        ds = datasets[index] = pydicom.dcmread(ds.filename)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(),
        instance_number=1)
    frames = image.pixel_array.copy()
    groups = list(image.PerFrameFunctionalGroupsSequence)
    stored_order = np.random.default_rng(seed).permutation(len(groups))  # not spatial order
    image.PerFrameFunctionalGroupsSequence = [groups[i] for i in stored_order]
    image.PixelData = frames[stored_order].tobytes()
    image.save_as(path)
    return stored[np.argsort(positions_k)].astype(np.int32) - 1024


def test_enhanced_multiframe_frames_are_placed_by_their_functional_groups(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = tmp_path / "in"  # one folder per case (a folder of DICOM files is one case)
    for name in ("shuffled", "two_echoes", "gap"):
        (inputs / name).mkdir(parents=True)
    hu = enhanced_ct(inputs / "shuffled" / "f.dcm", tmp_path, [2.5 * k for k in (3, 0, 4, 1, 2)])
    enhanced_ct(inputs / "two_echoes" / "f.dcm", tmp_path, [2.5 * k for k in range(4)], echoes=2)
    enhanced_ct(inputs / "gap" / "f.dcm", tmp_path, [0.0, 2.5, 5.0, 10.0])
    volume = read_volume(inputs / "shuffled" / "f.dcm")
    series = read_volume(tmp_path / "slices-shuffled")  # the single slices it was made from
    assert volume.same_grid(series, atol=1e-6) and np.array_equal(volume.array_kji, series.array_kji)
    np.testing.assert_allclose(volume.spacing_ijk, (0.7, 0.6, 2.5))
    np.testing.assert_allclose(volume.origin_lps, (-10.0, 5.0, 0.0))
    assert np.array_equal(volume.array_kji, hu)
    out = tmp_path / "out"
    code, events, _ = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint)], capsys)
    assert code == 1 and events[-1]["ok"] == 1 and events[-1]["failed"] == 2
    errors = {e["case"]: e["error"] for e in events if e["event"] == "case_error"}
    assert "share one position" in errors["two_echoes"] and "2 stacks" in errors["two_echoes"]
    assert "frame gaps are uneven" in errors["gap"]
    assert read_volume(out / "shuffled.nii.gz").same_grid(volume)


# ------------------------------------------------------------ 5. two runs on one folder
def test_a_second_run_leaves_the_temporary_files_of_a_live_run_alone(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    ct_volume(inputs / "a_0000.nrrd")
    ct_volume(inputs / "b_0000.nrrd", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    first_run = subprocess.Popen(["sleep", "60"])  # a live process writing b's output
    try:
        live = out / f".partial-{first_run.pid}-{HOST_TAG}-b.nii.gz"
        other_machine = out / f".partial-{first_run.pid}-00000000-a.nii.gz"
        for path in (live, other_machine):
            path.write_bytes(b"being written")
        code, _, _ = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint)], capsys)
        assert code == 0 and live.exists() and other_machine.exists()
    finally:
        first_run.kill()
        first_run.wait()
    code, _, _ = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint), "--overwrite"], capsys)
    assert code == 0 and not live.exists() and other_machine.exists()  # its writer is gone now


# ---------------------------------------------------------------------------- 6 and 7
def test_list_series_needs_no_output_folder(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    series = tmp_path / "CT_series"
    uid = write_ct_series(series, np.zeros((2, 8, 8), np.uint16), [(0, 0, 0), (0, 0, 1)])
    assert main(["-i", str(series), "--list-series"]) == 0
    assert uid in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["-i", str(series), "-m", "model.safetensors"])
    assert exit_.value.code == 2 and "-o/--output is required" in capsys.readouterr().err


def test_sigterm_writes_the_summary_of_what_finished_and_exits_143(
    checkpoint: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = 20  # enough that a loaded machine cannot finish them all before the signal lands
    for index in range(cases):
        ct_volume(inputs / f"case{index}_0000.nrrd", shape_ijk=(64, 64, 24), seed=index)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "sam2unet_core.cli.predict", "-i", str(inputs), "-o", str(out), "-m",
         str(checkpoint), "--device", "cpu", "--progress", "jsonl"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        for line in process.stdout:
            if json.loads(line)["event"] == "case_done":
                process.send_signal(signal.SIGTERM)
                break
        events = [json.loads(line) for line in process.stdout]
        assert process.wait(timeout=120) == 143
    finally:
        process.kill()
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["interrupted"] is True and 1 <= summary["ok"] < cases
    assert events[-1]["event"] == "done"
    for case in summary["cases"]:
        assert read_volume(case["output"]).same_grid(read_volume(case["input"]))


def test_complex_voxels_an_output_file_and_a_refused_nifti_header_are_said_once(
    checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """capfd: nibabel's own handler writes to the process's stderr."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    complex_image = sitk.RealAndImaginaryToComplex(sitk.Image(8, 8, 2, sitk.sitkFloat32),
                                                   sitk.Image(8, 8, 2, sitk.sitkFloat32))
    for fmt in ("mha", "nrrd"):  # MetaImage stores it as 2 components, NRRD as complex
        sitk.WriteImage(complex_image, str(inputs / f"kspace_{fmt}_0000.{fmt}"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.uint8), np.eye(4)), inputs / "bits_0000.nii")
    raw = bytearray((inputs / "bits_0000.nii").read_bytes())
    struct.pack_into("<hh", raw, 70, 1, 1)  # datatype DT_BINARY, 1 bit per voxel
    (inputs / "bits_0000.nii").write_bytes(bytes(raw))
    code, events, err = run(["-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(checkpoint)],
                            capfd)
    errors = {e["case"]: e["error"] for e in events if e["event"] == "case_error"}
    for fmt in ("mha", "nrrd"):
        assert "complex-valued" in errors[f"kspace_{fmt}"] and "colour images" not in errors[f"kspace_{fmt}"]
    assert code == 1
    assert "data code 1 not supported" in errors["bits"]
    assert (err + caplog.text).count("data code 1") == 1  # in the FAILED line, not from nibabel

    taken = tmp_path / "a_file"
    taken.write_text("not a folder")
    code, _, err = run(["-i", str(inputs), "-o", str(taken), "-m", str(checkpoint)], capfd)
    assert code == 2 and "is a file, not a folder" in err and "File exists" not in err
