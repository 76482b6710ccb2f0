"""Held-out inputs, round 2, through the real ``sam2unet-predict`` CLI (issue 12):

* NIfTI spatial units (micron, metre, unknown, mm): outputs in every format are placed where
  SimpleITK (and so Slicer) places the input, and SimpleITK, nibabel and our reader agree;
* batch-folder entries that cannot be read (dangling link, link loop, no read permission)
  are failed cases with the reason, the rest of the batch is written, exit code 1;
* memory limits of the process (RLIMIT_AS) are taken into account before allocating;
* ``.nii.gz`` files that are not compressed and ``.nii`` files that are: read, with a warning;
* DICOM SEG from an anonymised real CT series is refused before the model runs, naming the
  missing attributes; and no error of the readers or writers has an empty text.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path as NIBABEL_DATA
from pydicom.data import get_testdata_file
from scipy.spatial.transform import Rotation

from sam2unet_core.cli.predict import main
from sam2unet_core.io import read_volume
from sam2unet_core.io.convert import nifti_mm_per_unit
from sam2unet_core.io.readers import _read_sitk  # reads .seg.nrrd, which read_volume refuses
from sam2unet_core.io.volume import GIB, Volume, _meminfo_available
from sam2unet_core.io.writers import write_labels, write_probabilities

REPO = Path(__file__).resolve().parents[1]
CT_SERIES = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
CLI = Path(sys.executable).parent / "sam2unet-predict"
UNITS = {"micron": 0.001, "meter": 1000.0, "unknown": 1.0, "mm": 1.0}


@pytest.fixture(scope="module")
def checkpoint(grey_ct_checkpoint: Path) -> Path:
    return grey_ct_checkpoint


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[dict], str]:
    """The CLI in this process: exit code, JSON-lines events, stderr."""
    code = main(argv + ["--device", "cpu", "--progress", "jsonl"])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def oblique_nifti(path: Path, unit: str | int, seed: int, shape_ijk=(20, 18, 4)) -> Path:
    data = np.random.default_rng(seed).normal(40, 200, shape_ijk).astype(np.int16)
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("zx", [20, 10], degrees=True).as_matrix() \
        @ np.diag([0.9, 1.1, 3.0])
    affine[:3, 3] = [-20.0, 15.0, 40.0]
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units(0 if unit == "unknown" else unit, "sec")
    nib.save(image, path)
    return path


def sitk_geometry(image: sitk.Image) -> np.ndarray:
    return np.concatenate([image.GetSpacing(), image.GetOrigin(), image.GetDirection()])


def nibabel_affine_mm(path: Path) -> np.ndarray:
    """nibabel's affine (in the file's unit) converted to mm with the header's unit."""
    image = nib.load(path)
    return np.diag([nifti_mm_per_unit(image.header)[0]] * 3 + [1.0]) @ image.affine


# ------------------------------------------------------------------ 1. spatial units
@pytest.mark.parametrize("fmt", ["nii.gz", "nii", "nrrd", "mha", "seg.nrrd"])
def test_nifti_spatial_units_outputs_agree_for_simpleitk_nibabel_and_our_reader(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, fmt: str
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed, unit in enumerate(UNITS):
        oblique_nifti(inputs / f"{unit}_0000.nii.gz", unit, seed, shape_ijk=(16, 14, 2))
    out = tmp_path / "out"
    code, events, _ = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint),
                           "--format", fmt], capsys)
    assert code == 0 and events[-1]["ok"] == len(UNITS)
    for unit, mm_per_unit in UNITS.items():
        source = inputs / f"{unit}_0000.nii.gz"
        output = out / f"{unit}.{fmt}"
        reference = sitk.ReadImage(str(source))  # ITK converts metre/micron to mm
        np.testing.assert_allclose(sitk_geometry(sitk.ReadImage(str(output))),
                                   sitk_geometry(reference), rtol=1e-5, atol=1e-6)
        ours_in = read_volume(source)
        ours_out = _read_sitk(output) if fmt == "seg.nrrd" else read_volume(output)
        np.testing.assert_allclose(ours_in.spacing_ijk, reference.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(ours_in.origin_lps, reference.GetOrigin(), rtol=1e-5,
                                   atol=1e-6)
        assert ours_out.same_grid(ours_in, atol=1e-5 * max(1.0, mm_per_unit))
        expected_mm = np.diag([mm_per_unit] * 3 + [1.0]) @ nib.load(source).affine
        np.testing.assert_allclose(nibabel_affine_mm(source), expected_mm)
        if fmt.startswith("nii"):  # nibabel reads only the NIfTI outputs
            # the input's unit and raw affine: image and labels overlay for nibabel users too
            assert nib.load(output).header.get_xyzt_units()[0] == nib.load(source).header.get_xyzt_units()[0]
            np.testing.assert_allclose(nib.load(output).affine, nib.load(source).affine, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(nibabel_affine_mm(output), expected_mm,
                                       rtol=1e-5, atol=1e-5 * mm_per_unit)


def test_real_nifti_with_its_unit_rewritten_to_micron_lands_where_simpleitk_puts_it(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """nibabel's own anatomical.nii (mm) relabelled as micron and as metre."""
    image = nib.load(Path(NIBABEL_DATA) / "anatomical.nii")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for unit in ("micron", "meter"):
        copy = nib.Nifti1Image(np.asanyarray(image.dataobj), None, image.header.copy())
        copy.header.set_xyzt_units(unit)
        nib.save(copy, inputs / f"anat_{unit}.nii")
    code, _, _ = run(["-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(checkpoint)],
                     capsys)
    assert code == 0
    for unit in ("micron", "meter"):
        reference = sitk.ReadImage(str(inputs / f"anat_{unit}.nii"))
        output = sitk.ReadImage(str(tmp_path / "out" / f"anat_{unit}.nii.gz"))
        np.testing.assert_allclose(sitk_geometry(output), sitk_geometry(reference),
                                   rtol=1e-5, atol=1e-6)
        labels = nib.load(tmp_path / "out" / f"anat_{unit}.nii.gz")  # as nibabel, FSL, nnU-Net read it
        assert labels.header.get_xyzt_units()[0] == unit
        np.testing.assert_allclose(labels.affine, nib.load(inputs / f"anat_{unit}.nii").affine, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------- 2. unreadable batch entries
def test_dangling_links_and_link_loops_are_failed_cases_and_the_rest_is_written(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    oblique_nifti(inputs / "good_0000.nii.gz", "mm", 0)
    (inputs / "gone_0000.nii.gz").symlink_to(tmp_path / "moved" / "gone_0000.nii.gz")
    (inputs / "loop_0000.nii").symlink_to(inputs / "loop_0000.nii")
    (inputs / "series_link").symlink_to(tmp_path / "moved" / "series")  # a DICOM folder once
    (inputs / "notes.txt").symlink_to(tmp_path / "nowhere.txt")  # not an input: ignored
    out = tmp_path / "out"
    code, events, err = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint)], capsys)
    assert code == 1
    assert events[-1] == {"event": "done", "ok": 1, "failed": 3, "skipped": 0}
    summary = json.loads((out / "predict_summary.json").read_text())
    errors = {c["case"]: c["error"] for c in summary["cases"] if c["status"] == "failed"}
    assert set(errors) == {"gone", "loop", "series_link"}
    assert "a symbolic link to" in errors["gone"] and "which does not exist" in errors["gone"]
    assert str(inputs / "gone_0000.nii.gz") in errors["gone"]
    assert "symbolic link loop" in errors["loop"]
    assert "which does not exist" in errors["series_link"]
    for name, error in errors.items():
        assert f"FAILED {name}: {error}" in err
    assert (out / "good.nii.gz").exists()


@pytest.mark.parametrize("entry", ["dangling", "loop"])
def test_an_unreadable_entry_alone_is_a_failed_case_not_no_images_found(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, entry: str
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    link = inputs / "scan.nrrd"
    link.symlink_to(tmp_path / "elsewhere.nrrd" if entry == "dangling" else link)
    out = tmp_path / "out"
    code, events, err = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint)], capsys)
    assert code == 1 and "no images found" not in err
    assert events[-1] == {"event": "done", "ok": 0, "failed": 1, "skipped": 0}
    error = json.loads((out / "predict_summary.json").read_text())["cases"][0]["error"]
    assert str(link) in error and ("does not exist" in error or "loop" in error)


# Root reads whatever the mode bits say through these two capabilities; a process started
# without them (in its bounding and inheritable sets) obeys the bits as any user does. Unlike a
# switch to another user, it still reaches a checkout inside a 0700 folder (mktemp -d).
_NO_OVERRIDE = "-dac_override,-dac_read_search"


@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0,
                    reason="runs as root without setpriv: read permission bits do not stop root")
def test_entries_without_read_permission_are_failed_cases_for_a_user_bound_by_modes(
    checkpoint: Path,
) -> None:
    """A file and a DICOM series folder with mode 000 next to a good case, run by the real
    ``sam2unet-predict``; as root, without the capabilities that override mode bits."""
    work = Path(tempfile.mkdtemp(prefix="sam2unet-perm-", dir="/tmp"))
    try:
        inputs = work / "in"
        inputs.mkdir()
        oblique_nifti(inputs / "good_0000.nii.gz", "mm", 0)
        oblique_nifti(inputs / "secret_0000.nii.gz", "mm", 1)
        shutil.copytree(CT_SERIES, inputs / "ctseries")
        shutil.copy(checkpoint, work / "model.safetensors")
        os.chmod(inputs / "secret_0000.nii.gz", 0)
        os.chmod(inputs / "ctseries", 0)
        command = [str(CLI), "-i", str(inputs), "-o", str(work / "out"), "-m",
                   str(work / "model.safetensors"), "--device", "cpu", "--progress", "none"]
        if os.geteuid() == 0:
            command = ["setpriv", f"--bounding-set={_NO_OVERRIDE}", f"--inh-caps={_NO_OVERRIDE}",
                       *command]
        env = {**os.environ, "HOME": str(work), "PYTHONPATH": str(REPO),
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 1, done.stderr
        summary = json.loads((work / "out" / "predict_summary.json").read_text())
        errors = {c["case"]: c["error"] for c in summary["cases"] if c["status"] == "failed"}
        assert set(errors) == {"secret", "ctseries"}
        assert "no permission to read this file" in errors["secret"]
        assert "no permission to read this folder" in errors["ctseries"]
        assert str(inputs / "ctseries") in errors["ctseries"]
        for name, error in errors.items():
            assert f"FAILED {name}: {error}" in done.stderr
        assert (work / "out" / "good.nii.gz").exists()
    finally:
        for root, dirs, _ in os.walk(work):
            for name in dirs:
                os.chmod(Path(root) / name, 0o755)
        shutil.rmtree(work, ignore_errors=True)


# -------------------------------------------------------------- 3. memory limits
def _huge_nifti(path: Path, shape_ijk: tuple[int, int, int]) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape_ijk)
    header.set_data_dtype(np.int16)
    with open(path, "wb") as stream:  # the header only: the voxels would be GiBs
        header.write_to(stream)
        stream.write(b"\0" * (int(header["vox_offset"]) - stream.tell()))
    return path


def _huge_nrrd(path: Path, shape_ijk: tuple[int, int, int]) -> Path:
    path.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: %d %d %d\nspace: left-posterior-superior\n"
        "space directions: (1,0,0) (0,1,0) (0,0,1)\nencoding: raw\nendian: little\n\n"
        % shape_ijk
    )
    return path


def _huge_mha(path: Path, shape_ijk: tuple[int, int, int]) -> Path:
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = %d %d %d\nElementType = MET_SHORT\n"
        "ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n" % shape_ijk
    )
    return path


def test_address_space_limit_refuses_huge_headers_before_allocating(
    checkpoint: Path, tmp_path: Path
) -> None:
    """``ulimit -v`` 4 GiB: three headers of 6 GiB images (NIfTI, NRRD, MHA) fail with how
    much they need, how much the limit leaves and which limit; the small case is written."""
    shape = (1024, 1024, 2048)  # int16 + a uint8 label map: 6 GiB
    needed = int(np.prod(shape)) * 3
    free = _meminfo_available()
    if free is not None and free < needed:
        pytest.skip(f"the machine has only {free / GIB:.1f} GiB available now: the limit "
                    "named would be MemAvailable, not RLIMIT_AS")
    inputs = tmp_path / "in"
    inputs.mkdir()
    oblique_nifti(inputs / "small_0000.nii.gz", "mm", 0)
    huge = [_huge_nifti(inputs / "hugenii.nii", shape), _huge_nrrd(inputs / "hugenrrd.nrrd", shape),
            _huge_mha(inputs / "hugemha.mha", shape)]
    limit = 4 * GIB
    out = tmp_path / "out"
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, resource.RLIM_INFINITY))\n"
        "from sam2unet_core.cli.predict import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "-i", str(inputs), "-o", str(out), "-m", str(checkpoint),
         "--device", "cpu", "--progress", "none"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1, done.stderr
    summary = json.loads((out / "predict_summary.json").read_text())
    errors = {c["case"]: c["error"] for c in summary["cases"] if c["status"] == "failed"}
    assert set(errors) == {"hugenii", "hugenrrd", "hugemha"}
    for path in huge:
        error = errors[path.name.split(".")[0]]
        assert str(path) in error and "()" not in error
        assert f"needs about {needed / GIB:.3g} GiB, " in error
        assert "GiB available (limited by the process's address-space limit" in error
        available = float(error.split("GiB, ")[1].split(" GiB available")[0])
        assert 0 < available < limit / GIB
        assert f"FAILED {path.name.split('.')[0]}: {error}" in done.stderr
    assert (out / "small.nii.gz").exists()


# ----------------------------------------------------- 4. compression that the name denies
def test_nifti_compression_is_read_from_the_bytes_with_a_warning_naming_the_file(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    plain = oblique_nifti(tmp_path / "plain.nii", "mm", 0)
    shutil.copy(plain, inputs / "plain_0000.nii.gz")  # not compressed, named .nii.gz
    (inputs / "packed_0000.nii").write_bytes(gzip.compress(plain.read_bytes()))
    real = Path(NIBABEL_DATA)
    (inputs / "anat_0000.nii").write_bytes(gzip.compress((real / "anatomical.nii").read_bytes()))
    nifti2 = gzip.decompress((real / "example_nifti2.nii.gz").read_bytes())
    (inputs / "two_0000.nii.gz").write_bytes(nifti2)  # NIfTI-2, not compressed
    oblique_nifti(inputs / "right_0000.nii.gz", "micron", 3)  # named right: no warning
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="sam2unet_core.io.readers"):
        code, events, _ = run(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint),
                               "--volume-index", "0"], capsys)
    assert code == 0 and events[-1]["ok"] == 5
    warned = {r.getMessage().split(":")[0] for r in caplog.records}
    assert warned == {str(inputs / name) for name in
                      ("plain_0000.nii.gz", "packed_0000.nii", "anat_0000.nii", "two_0000.nii.gz")}
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "is not compressed but its name ends in .nii.gz" in text
    assert "is gzip-compressed but its name ends in .nii" in text
    references = {"plain": plain, "packed": plain, "anat": real / "anatomical.nii",
                  "two": real / "example_nifti2.nii.gz", "right": inputs / "right_0000.nii.gz"}
    for name, reference in references.items():  # the same bytes under their right name
        source = next(inputs.glob(f"{name}_0000.nii*"))
        assert read_volume(out / f"{name}.nii.gz").same_grid(
            read_volume(source, volume_index=0), atol=1e-5)
        assert read_volume(source, volume_index=0).same_grid(
            read_volume(reference, volume_index=0), atol=1e-6)
        if name != "two":  # 4D: SimpleITK's geometry has a 4th axis
            np.testing.assert_allclose(sitk_geometry(sitk.ReadImage(str(out / f"{name}.nii.gz"))),
                                       sitk_geometry(sitk.ReadImage(str(reference))),
                                       rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(read_volume(inputs / "plain_0000.nii.gz").array_kji,
                                  read_volume(plain).array_kji)


# -------------------------------------------------- 5. DICOM SEG from anonymised sources
def anonymised_series(folder: Path, blank: tuple[str, ...], delete: tuple[str, ...] = (),
                      only_first: bool = False) -> Path:
    """The real CT series with attributes blanked (kept, empty) or deleted; the file meta
    and the FrameOfReferenceUID keep theirs."""
    shutil.copytree(CT_SERIES, folder)
    for index, path in enumerate(sorted(folder.iterdir())):
        if only_first and index:
            continue
        dataset = pydicom.dcmread(path)
        for keyword in blank:
            setattr(dataset, keyword, "")
        for keyword in delete:
            delattr(dataset, keyword)
        dataset.save_as(path)
    return folder


ANONYMISED = {
    "all_uids_blank": (("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID",
                        "StudyInstanceUID"), (), False),
    "sop_class_blank": (("SOPClassUID",), (), False),
    "study_deleted_in_one": ((), ("StudyInstanceUID",), True),
    "instance_and_modality_blank": (("SOPInstanceUID", "Modality"), (), False),
}


def test_dicom_seg_from_anonymised_series_is_refused_before_the_model_naming_attributes(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    inputs = tmp_path / "in"
    for name, (blank, delete, only_first) in ANONYMISED.items():
        anonymised_series(inputs / name, blank, delete, only_first)
    code, events, err = run(["-i", str(inputs), "-o", str(tmp_path / "seg"), "-m",
                             str(checkpoint), "--format", "dcm"], capsys)
    assert code == 1 and events[-1] == {"event": "done", "ok": 0, "failed": 4, "skipped": 0}
    assert not any(e["event"] == "case_start" for e in events)  # refused before the model
    errors = {e["case"]: e["error"] for e in events if e["event"] == "case_error"}
    for name, (blank, delete, only_first) in ANONYMISED.items():
        error = errors[name]
        assert str(inputs / name) in error and "formats that work without them: nii.gz" in error and "seg.nrrd" in error
        for keyword in blank + delete:
            assert f"{keyword} in {1 if only_first else 5} of 5 files" in error
        assert f"FAILED {name}: {error}" in err
    assert "SeriesInstanceUID in 5 of 5" in errors["all_uids_blank"]
    assert [p.name for p in (tmp_path / "seg").iterdir()] == ["predict_summary.json"]

    code, events, _ = run(["-i", str(inputs), "-o", str(tmp_path / "nii"), "-m",
                           str(checkpoint), "--format", "nii.gz"], capsys)
    assert code == 0 and events[-1]["ok"] == 4  # the other formats work


# ------------------------------------------------------- error texts are never empty
def _error_cases(tmp_path: Path) -> list[tuple[str, object]]:
    """(file the message must name, a call that must raise ValueError) for the readers'
    and writers' error paths."""
    good = oblique_nifti(tmp_path / "good.nii.gz", "mm", 0)
    volume = read_volume(good)
    labels = volume.with_array(np.zeros(volume.shape_kji, np.uint8))
    anonymised = read_volume(anonymised_series(
        tmp_path / "anon", ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID",
                            "StudyInstanceUID")))
    dicom = read_volume(CT_SERIES)
    dicom_labels = dicom.with_array(np.ones(dicom.shape_kji, np.uint8))
    files = {
        "empty.nii.gz": b"", "garbage.nii.gz": b"not a nifti", "garbage.nii": b"\x1f\x8b junk",
        "garbage.nrrd": b"NRRD0004\nsizes: x\n\n", "garbage.mha": b"NDims = 9\n",
        "garbage.png": b"\x89PNG\r\n", "garbage.dcm": b"\0" * 128 + b"DICM\xff\xff",
        "cut.nii.gz": good.read_bytes()[:200], "unknown.xyz": b"data",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "dangling.nii").symlink_to(tmp_path / "missing.nii")
    (tmp_path / "loop.nii").symlink_to(tmp_path / "loop.nii")
    (tmp_path / "file_as_folder").write_text("x")
    (tmp_path / "notdicom").mkdir()
    cases: list[tuple[str, object]] = [
        (str(tmp_path / name), lambda name=name: read_volume(tmp_path / name))
        for name in [*files, "dangling.nii", "loop.nii", "absent.nii", "notdicom"]
    ]
    cases += [
        (str(tmp_path / "l.dcm"), lambda: write_labels(labels, tmp_path / "l.dcm")),
        (str(anonymised.source), lambda: write_labels(
            anonymised.with_array(np.ones(anonymised.shape_kji, np.uint8)), tmp_path / "a.dcm")),
        (str(tmp_path / "f.nii.gz"), lambda: write_labels(
            volume.with_array(np.zeros(volume.shape_kji, np.float32)), tmp_path / "f.nii.gz")),
        (str(tmp_path / "l.png"), lambda: write_labels(labels, tmp_path / "l.png")),
        (str(tmp_path / "l.xyz"), lambda: write_labels(labels, tmp_path / "l.xyz")),
        (str(tmp_path / "p.png"), lambda: write_probabilities(labels, tmp_path / "p.png")),
        (str(tmp_path / "k.dcm"), lambda: write_labels(dicom_labels, tmp_path / "k.dcm",
                                                       [_KeyErrorLabel()])),
    ]
    return cases


class _KeyErrorLabel:
    """A label whose name lookup raises ``KeyError('')`` inside the SEG writer, as highdicom
    did on blank UIDs: the writer boundary must still give a non-empty message."""

    value = 1
    color = (255, 0, 0)
    category = type = modifier = None  # no stored codes: the name table is consulted

    @property
    def name(self) -> str:
        raise KeyError("")


def test_no_reader_or_writer_error_has_an_empty_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = _error_cases(tmp_path)
    from sam2unet_core.io import readers

    def out_of_memory(path: Path, options: readers.ReadOptions) -> Volume:
        raise MemoryError()

    monkeypatch.setitem(readers.READERS, ".mhd", out_of_memory)
    (tmp_path / "oom.mhd").write_text("ObjectType = Image\n")
    cases.append((str(tmp_path / "oom.mhd"), lambda: read_volume(tmp_path / "oom.mhd")))
    for name, call in cases:
        with pytest.raises(ValueError) as caught:
            call()
        text = str(caught.value)
        assert name in text, text
        detail = text.replace(name, "").strip(" :")
        assert detail.strip("'\"() ") and "()" not in text and "''" != detail, text
    oom = str(pytest.raises(ValueError, read_volume, tmp_path / "oom.mhd").value)
    assert "MemoryError" in oom and "GiB available, limited by" in oom
    keyerror = str(pytest.raises(ValueError, write_labels, read_volume(CT_SERIES).with_array(
        np.ones(read_volume(CT_SERIES).shape_kji, np.uint8)), tmp_path / "k2.dcm",
        [_KeyErrorLabel()]).value)
    assert "KeyError: no details given" in keyerror
    assert not list(tmp_path.glob(".partial-*"))


def test_a_dangling_link_inside_a_loose_dicom_series_folder_keeps_it_one_case(
    tmp_path: Path,
) -> None:
    """Scanner exports have files without endings; a dead link among them is not a case."""
    from sam2unet_core.io.cases import find_cases

    series = shutil.copytree(CT_SERIES, tmp_path / "series")
    (series / "IM0099").symlink_to(tmp_path / "deleted" / "IM0099")
    cases = find_cases(series)
    assert [(c.name, c.path) for c in cases] == [("series", series)]
    assert read_volume(series).shape_kji == read_volume(CT_SERIES).shape_kji
