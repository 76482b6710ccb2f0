"""Robustness matrix (issue 8): every kind of bad or odd input through the real
``sam2unet-predict`` ``main()`` with a tiny hiera_t model (64 px) and real files written with
nibabel, SimpleITK and pydicom.

All image rows are cases of ONE batch folder, run once (module fixture): each row then
checks its own case. A row that must fail checks that the error names the file and the
problem and that no output (nor any ``.partial-*`` file) exists; a row that must just work
checks that the label map lies exactly on the input's grid. Every row also checks that the
good reference cases of the same batch were segmented. Checkpoint and output-folder rows
need their own runs (other ``-m`` / ``-o``).

Rows covered elsewhere are listed with the test that covers them and skipped here:
    * broken NIfTI bytes, extra-channel files:
      ``test_cli_predict.py::test_folder_run_names_outputs_keeps_geometry_and_survives_bad_files``
    * uneven DICOM slice gaps, mixed orientations, duplicate positions, folder without DICOM
      (reader level): ``test_io_dicom.py::test_series_that_are_not_one_regular_volume_are_refused``,
      ``::test_folder_without_dicom_and_duplicate_positions_are_refused``
    * pickle that would run code, truncated/empty checkpoints (loader level):
      ``test_checkpoint.py::test_pickle_that_would_run_code_is_refused_and_never_executed``,
      ``::test_truncated_and_empty_files_give_a_clear_error_naming_the_file``
    * corrupt bytes found by fuzzing (reader level): ``test_io_fuzz_findings.py``
    * kill -9 of a batch run: ``test_cli_predict.py::test_killed_run_resumes_and_skips_finished_cases``
    * kill -9 during training: ``test_train_run.py::test_resume_after_a_kill_mid_epoch_is_exact``
    * Slicer cancel: ``test_slicer_end_to_end.py::test_real_cli_cancel_leaves_the_scene_as_it_was``
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import socket
import struct
from contextlib import redirect_stdout
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from safetensors.torch import save_file
from scipy.spatial.transform import Rotation

from dicom_data import write_ct_series
from sam2unet_core import SAM2UNet, save_model
from sam2unet_core.checkpoint import METADATA_KEY
from sam2unet_core.cli.predict import main
from sam2unet_core.io import writers
from sam2unet_core.metadata import Architecture, ModelMetadata

SHAPE_IJK = (32, 32, 4)  # tiny volumes: 4 slices of 32 x 32
GOOD_CASES = ("good_ct", "good_dicom")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: SAM2UNet) -> Path:
    """The conftest's random hiera_t binary model (3 channels, ImageNet mean/std) at 64 px,
    with percentile intensity so that NaN/Inf and every dtype go through the statistics."""
    meta = ModelMetadata(
        architecture=Architecture("hiera_t", num_classes=1, in_channels=3), input_size=64,
        intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5},
    )
    return save_model(tiny_model, tmp_path_factory.mktemp("model") / "tiny.safetensors", meta)


# ------------------------------------------------------------------------ input files
def voxels(dtype: str = "int16", seed: int = 0) -> np.ndarray:
    """``SHAPE_IJK`` values spread over much of the dtype's range."""
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(SHAPE_IJK) > 0.5
    kind = np.dtype(dtype)
    if kind.kind == "f":
        return rng.normal(0, 100, SHAPE_IJK).astype(dtype)
    info = np.iinfo(kind)
    low, high = max(info.min, -(2**62)), info.max  # uint64: values past 2**63 too
    return (low + rng.random(SHAPE_IJK) * (float(high) - float(low))).astype(dtype)


def affine(direction: np.ndarray = np.eye(3), spacing=(0.8, 0.9, 2.5)) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = np.asarray(direction, dtype=float) @ np.diag(spacing)
    out[:3, 3] = [-12.0, 7.5, 30.0]
    return out


def nifti(folder: Path, name: str, data: np.ndarray, matrix: np.ndarray | None = None) -> Path:
    path = folder / name
    nib.save(nib.Nifti1Image(data, affine() if matrix is None else matrix, dtype=data.dtype), path)
    return path


def nifti_corrupted(folder: Path, name: str, edit: Callable[[bytes], bytes]) -> Path:
    path = nifti(folder, name, voxels())
    path.write_bytes(edit(path.read_bytes()))
    return path


def flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


def nifti_claiming_huge_size(folder: Path, name: str) -> Path:
    """A .nii whose header says 30000^3 int16 voxels (54 TB); only 8 voxels follow."""
    header = bytearray(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)).to_bytes())
    header[40:48] = struct.pack("<4h", 3, 30000, 30000, 30000)  # dim[0..3]
    (folder / name).write_bytes(bytes(header))
    return folder / name


def mha_claiming_huge_size(folder: Path, name: str) -> Path:
    (folder / name).write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 30000 30000 30000\n"
        b"ElementType = MET_SHORT\nElementDataFile = LOCAL\n" + bytes(16))
    return folder / name


def sitk_file(folder: Path, name: str, array_kji: np.ndarray, vector: bool = False,
              direction_lps: np.ndarray | None = None) -> Path:
    """A 2D or 3D (colour when ``vector``) image written by SimpleITK; oblique by default."""
    image = sitk.GetImageFromArray(array_kji, isVector=vector)
    dim = image.GetDimension()
    if direction_lps is None:
        direction_lps = Rotation.from_euler("y", 20, degrees=True).as_matrix()
    image.SetSpacing((0.7, 0.7, 3.0)[:dim])
    image.SetOrigin((5.0, -3.0, 12.0)[:dim])
    image.SetDirection(np.asarray(direction_lps)[:dim, :dim].ravel().tolist())
    sitk.WriteImage(image, str(folder / name))
    return folder / name


def rgb_nifti(folder: Path, name: str, alpha: bool) -> Path:
    fields = [("R", "u1"), ("G", "u1"), ("B", "u1")] + ([("A", "u1")] if alpha else [])
    data = np.zeros(SHAPE_IJK, dtype=fields)
    rng = np.random.default_rng(4)
    for field, _ in fields:
        data[field] = rng.integers(0, 255, SHAPE_IJK)
    return nifti(folder, name, data)


def dicom_series(
    folder: Path,
    positions_mm: list[float],
    column: tuple[float, float, float] = (0.0, 1.0, 0.0),
    step_lps: tuple[float, float, float] = (0.0, 0.0, 1.0),
    tags: dict[str, str] | None = None,
) -> Path:
    """A CT series of 16 x 16 slices at ``positions_mm`` along ``step_lps`` (the slice
    normal unless testing a gantry tilt); ``column`` is the column direction cosine."""
    pixels = np.random.default_rng(len(positions_mm)).integers(-1000, 1000, (len(positions_mm), 16, 16))
    positions = [np.array([-20.0, -10.0, 5.0]) + p * np.asarray(step_lps) for p in positions_mm]
    write_ct_series(folder, pixels.astype(np.int16), positions, column=column, tags=tags)
    return folder


def non_image_object(path: Path, sop_class: str, modality: str) -> None:
    """A DICOM object without pixels (structured report, presentation state)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, generate_uid(), generate_uid()
    ds.save_as(path, enforce_file_format=True)


def series_with_non_images(folder: Path, name: str) -> Path:
    path = dicom_series(folder / name, list(range(0, 8, 2)))
    non_image_object(path / "report.dcm", pydicom.uid.BasicTextSRStorage, "SR")
    non_image_object(path / "pstate", pydicom.uid.GrayscaleSoftcopyPresentationStateStorage, "PR")
    (path / "DICOMDIR.txt").write_text("notes, not DICOM")
    return path


def mixed_series(folder: Path, name: str) -> Path:
    dicom_series(folder / name / "thin", list(range(0, 8, 2)))
    dicom_series(folder / name / "scout", [0.0, 40.0], column=(0.0, 0.0, -1.0),
                 step_lps=(0.0, 1.0, 0.0))
    return folder / name


def not_dicom_folder(folder: Path, name: str) -> Path:
    (folder / name).mkdir()
    (folder / name / "image.dcm").write_text("a text file named like DICOM")
    return folder / name


# ------------------------------------------------------------------------ the matrix
# (case name, builder(folder, case name) -> input path, expected error regex or None = works)
Builder = Callable[[Path, str], Path]
OBLIQUE = Rotation.from_euler("zyx", [30, -20, 10], degrees=True).as_matrix()
LPS = np.diag([-1.0, -1.0, 1.0])  # stored in LPS order: i to the left, j posterior
PLS = np.array([[0, -1, 0], [-1, 0, 0], [0, 0, 1.0]])  # i posterior, j left
ROTATED_IN_PLANE = Rotation.from_euler("z", 25, degrees=True).as_matrix()

ROWS: list[tuple[str, Builder, str | None]] = [
    ("good_ct", lambda f, n: nifti(f, n + ".nii.gz", voxels()), None),
    ("good_dicom", lambda f, n: dicom_series(f / n, list(range(0, 8, 2))), None),
    # corrupt and empty files
    ("truncated_nifti", lambda f, n: nifti_corrupted(
        f, n + ".nii.gz", lambda b: b[: len(b) // 2]), "Compressed file ended"),
    ("corrupt_nifti", lambda f, n: nifti_corrupted(f, n + ".nii.gz", flip_middle),
     "corrupt or unreadable file|not a readable NIfTI"),
    ("empty_nifti", lambda f, n: (f / (n + ".nii.gz")).write_bytes(b"") or f / (n + ".nii.gz"),
     "the file is empty"),
    ("empty_mha", lambda f, n: (f / (n + ".mha")).write_bytes(b"") or f / (n + ".mha"),
     "the file is empty"),
    # dimensions
    ("time_axis_of_one", lambda f, n: nifti(f, n + ".nii.gz", voxels()[..., np.newaxis]), None),
    ("real_4d", lambda f, n: nifti(f, n + ".nii.gz", np.stack([voxels(seed=s) for s in range(3)], -1)),
     "3 volumes/channels.*volume index"),  # --volume-index: test_volume_index_* below
    ("nifti_2d", lambda f, n: nifti(f, n + ".nii.gz", voxels()[:, :, 0]), None),
    ("mha_2d", lambda f, n: sitk_file(f, n + ".mha", voxels()[:, :, 0].T.copy(),
                                      direction_lps=ROTATED_IN_PLANE), None),
    ("nifti_1d", lambda f, n: nifti(f, n + ".nii.gz", voxels()[:, 0, 0]),
     "expected a 3D volume"),
    # values
    ("nan_voxels", lambda f, n: nifti(f, n + ".nii.gz", np.where(
        voxels("float32") > 50, np.nan, voxels("float32")).astype(np.float32)), None),
    ("inf_voxels", lambda f, n: nifti(f, n + ".nii.gz", np.select(
        [voxels("float32") > 150, voxels("float32") < -150],
        [np.inf, -np.inf], voxels("float32")).astype(np.float32)), None),
    ("all_nan", lambda f, n: nifti(f, n + ".nii.gz", np.full(SHAPE_IJK, np.nan, np.float32)),
     "no finite values"),
    ("complex_voxels", lambda f, n: nifti(f, n + ".nii.gz", voxels("float32").astype(np.complex64)),
     "complex64 are not supported"),
    *[(f"dtype_{dtype}", (lambda d: lambda f, n: nifti(f, n + ".nii.gz", voxels(d)))(dtype), None)
      for dtype in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                    "float32", "float64")],
    # bool and float16: no NIfTI/NRRD/MHA code exists for them; see
    # test_bool_and_float16_arrays_segment_like_their_uint8_and_float32_values below.
    # colour
    ("rgb24_nifti", lambda f, n: rgb_nifti(f, n + ".nii.gz", alpha=False), None),
    ("rgba32_nifti", lambda f, n: rgb_nifti(f, n + ".nii", alpha=True), None),
    ("rgb_mha", lambda f, n: sitk_file(f, n + ".mha", np.random.default_rng(5).integers(
        0, 255, (4, 32, 32, 3), dtype=np.uint8), vector=True), None),
    # geometry
    ("thick_slices",
     lambda f, n: nifti(f, n + ".nii.gz", voxels(), affine(spacing=(0.5, 0.5, 12.0))), None),
    ("very_anisotropic",
     lambda f, n: nifti(f, n + ".nii.gz", voxels(), affine(spacing=(0.05, 4.0, 30.0))), None),
    ("oblique", lambda f, n: nifti(f, n + ".nii.gz", voxels(), affine(OBLIQUE)), None),
    ("stored_lps", lambda f, n: nifti(f, n + ".nii.gz", voxels(), affine(LPS)), None),
    ("stored_pls", lambda f, n: nifti(f, n + ".nii.gz", voxels(), affine(PLS)), None),
    ("stored_pls_mha", lambda f, n: sitk_file(f, n + ".mha", voxels().T.copy(), direction_lps=PLS), None),
    # DICOM folders
    ("dicom_mixed_series", mixed_series, None),
    ("dicom_missing_slice", lambda f, n: dicom_series(f / n, [0, 2, 4, 8, 10, 12]),
     "slice gaps are uneven.*missing slices"),
    ("dicom_uneven_spacing", lambda f, n: dicom_series(f / n, [0, 2, 4, 6.5, 9, 11.5]),
     "slice gaps are uneven"),
    ("dicom_gantry_tilt", lambda f, n: dicom_series(
        f / n, list(range(0, 8, 2)), column=(0.0, np.cos(0.3), -np.sin(0.3))),
     "gantry tilt"),
    ("dicom_with_non_images", series_with_non_images, None),
    ("no_dicom_at_all", not_dicom_folder, "no DICOM image files"),
    # memory
    ("huge_nifti", lambda f, n: nifti_claiming_huge_size(f, n + ".nii"), "needs about .* GiB"),
    ("huge_mha", lambda f, n: mha_claiming_huge_size(f, n + ".mha"), "needs about .* GiB"),
]


def run_cli(argv: list[str]) -> tuple[int, list[dict]]:
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        code = main(argv + ["--device", "cpu", "--progress", "jsonl"])
    return code, [json.loads(line) for line in stdout.getvalue().splitlines()]


@pytest.fixture(scope="module")
def batch(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every row of ROWS as one case of one folder, run once."""
    folder = tmp_path_factory.mktemp("matrix_inputs")
    inputs = {name: build(folder, name) for name, build, _ in ROWS}
    out = tmp_path_factory.mktemp("matrix_outputs")
    code, events = run_cli(["-i", str(folder), "-o", str(out), "-m", str(checkpoint)])
    return {"code": code, "events": events, "inputs": inputs, "out": out}


def reference_image(path: Path) -> sitk.Image:
    """The input as SimpleITK reads it (the largest series of a DICOM folder)."""
    if not path.is_dir():
        return sitk.ReadImage(str(path))
    reader = sitk.ImageSeriesReader()
    folders = sorted({f.parent for f in path.rglob("slice*.dcm")}, key=lambda d: -len(list(d.iterdir())))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folders[0])))
    return reader.Execute()


@pytest.mark.parametrize(("name", "expected_error"), [(n, e) for n, _, e in ROWS],
                         ids=[n for n, _, _ in ROWS])
def test_matrix_row(batch: dict, name: str, expected_error: str | None) -> None:
    events, out, source = batch["events"], batch["out"], batch["inputs"][name]
    finished = {e["case"]: e for e in events if e["event"] in ("case_done", "case_error")}
    assert batch["code"] == 1  # some rows fail, so the batch exits 1
    for good in GOOD_CASES:  # the rest of the batch went on
        assert finished[good]["event"] == "case_done" and Path(finished[good]["output"]).is_file()
    assert not [p for p in out.rglob("*") if p.name.startswith(".partial-")]
    outputs = sorted(p.name for p in out.iterdir() if p.name.split(".")[0] == name)
    if expected_error is None:
        assert finished[name]["event"] == "case_done", finished[name]
        assert outputs == [f"{name}.nii.gz"]
        labels, reference = sitk.ReadImage(str(out / outputs[0])), reference_image(source)
        dim = reference.GetDimension()  # 2D inputs give one-slice 3D label maps
        assert labels.GetSize() == reference.GetSize() + (1,) * (3 - dim)
        direction = np.reshape(labels.GetDirection(), (3, 3))[:dim, :dim]
        np.testing.assert_allclose(labels.GetSpacing()[:dim], reference.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(labels.GetOrigin()[:dim], reference.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(direction.ravel(), reference.GetDirection(), atol=1e-5)
        if source.name.endswith((".nii", ".nii.gz")):  # nibabel places it on the input too
            np.testing.assert_allclose(nib.load(out / outputs[0]).affine, nib.load(source).affine,
                                       atol=1e-4)
    else:
        assert finished[name]["event"] == "case_error", finished[name]
        message = finished[name]["error"]
        assert str(source) in message
        assert re.search(expected_error, message), message
        assert outputs == []


def test_batch_summary_counts_every_row(batch: dict) -> None:
    failing = sum(error is not None for _, _, error in ROWS)
    summary = json.loads((batch["out"] / "predict_summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (len(ROWS) - failing, failing)
    assert batch["events"][-1] == {"event": "done", "ok": len(ROWS) - failing,
                                   "failed": failing, "skipped": 0}


def test_bool_and_float16_arrays_segment_like_their_uint8_and_float32_values(
    checkpoint: Path,
) -> None:
    """No NIfTI/NRRD/MHA code exists for bool or float16 voxels, but API users hand such
    arrays to the engine: they give the labels of the same values in uint8 / float32."""
    from sam2unet_core import load_model
    from sam2unet_core.inference import Predictor
    from sam2unet_core.io import Volume

    predictor = Predictor(load_model(checkpoint), device="cpu")
    values = np.random.default_rng(7).integers(0, 1000, (2, 32, 32))  # exact in float16
    mask = values > 500
    for odd, plain in ((mask, mask.astype(np.uint8)),
                       (values.astype(np.float16), values.astype(np.float32))):
        np.testing.assert_array_equal(predictor.predict(Volume(odd)).labels.array_kji,
                                      predictor.predict(Volume(plain)).labels.array_kji)


def test_volume_index_segments_one_volume_of_a_4d_image_like_that_volume_alone(
    checkpoint: Path, tmp_path: Path
) -> None:
    cases = tmp_path / "cases"
    cases.mkdir()
    volumes = [voxels(seed=s) for s in range(3)]
    nifti(cases, "series.nii.gz", np.stack(volumes, axis=-1))
    nifti(cases, "plain.nii.gz", volumes[1])  # a 3D case of the same batch: read as it is
    code, events = run_cli(["-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(checkpoint),
                            "--volume-index", "1"])
    assert code == 0 and events[-1]["ok"] == 2
    series, plain = (nib.load(tmp_path / "out" / f"{n}.nii.gz") for n in ("series", "plain"))
    assert series.shape == SHAPE_IJK
    np.testing.assert_allclose(series.affine, nib.load(cases / "series.nii.gz").affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(series.dataobj), np.asanyarray(plain.dataobj))

    code, events = run_cli(["-i", str(cases / "series.nii.gz"), "-o", str(tmp_path / "again"),
                            "-m", str(checkpoint), "--volume-index", "3"])
    error = next(e for e in events if e["event"] == "case_error")["error"]
    assert code == 1 and str(cases / "series.nii.gz") in error
    assert "volume index 3 is outside the 3 volumes" in error
    assert not (tmp_path / "again" / "series.nii.gz").exists()


def test_probability_maps_that_would_not_fit_in_memory_are_refused_before_any_work(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Free memory (faked: 16 KiB) holds the 32x32x4 int16 image and its labels (12 KiB)
    but not labels plus float32 probabilities (20 KiB): a clear case error, no output."""
    from sam2unet_core.io import volume as volume_module

    monkeypatch.setattr(volume_module, "available_memory",
                        lambda: (16 * 1024, "a faked limit"))
    image = nifti(tmp_path, "case.nii.gz", voxels())
    out = tmp_path / "out"
    code, events = run_cli(["-i", str(image), "-o", str(out), "-m", str(checkpoint),
                            "--save-probabilities"])
    error = next(e for e in events if e["event"] == "case_error")["error"]
    assert code == 1 and str(image) in error
    assert "float32 probabilities of shape (4, 32, 32) needs about" in error
    assert "without --save-probabilities" in error
    assert next(e for e in events if e["event"] == "case_error")["kind"] == "out_of_memory"
    assert not list(out.rglob("case*"))


# ------------------------------------------------------------- checkpoints (own runs)
class _RunsCode:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def other_architecture(folder: Path, tiny_model: SAM2UNet) -> Path:
    """hiera_t tensors under metadata that says hiera_s (another architecture)."""
    meta = ModelMetadata(architecture=Architecture("hiera_s", num_classes=1, in_channels=3))
    path = folder / "other.safetensors"
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(state, str(path), metadata={METADATA_KEY: meta.to_json()})
    return path


def official_with_missing_keys(folder: Path, tiny_model: SAM2UNet) -> Path:
    state = dict(tiny_model.state_dict())
    for key in [k for k in state if k.startswith("head.")]:
        del state[key]
    path = folder / "missing.pth"
    torch.save(state, path)
    return path


def truncated_checkpoint(folder: Path, tiny_model: SAM2UNet) -> Path:
    path = save_model(tiny_model, folder / "cut.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def code_pickle(folder: Path, tiny_model: SAM2UNet) -> Path:
    path = folder / "evil.pth"
    torch.save({"head.weight": _RunsCode(folder / "executed")}, path)
    return path


def raw_code_pickle(folder: Path, tiny_model: SAM2UNet) -> Path:
    path = folder / "evil.pkl"
    path.write_bytes(pickle.dumps(_RunsCode(folder / "executed")))
    return path


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (other_architecture, "size mismatch|shape|hiera_s"),
        (official_with_missing_keys, "missing"),
        (truncated_checkpoint, "not a readable safetensors"),
        (code_pickle, "refused to load"),
        (raw_code_pickle, "refused to load|corrupt|not"),
    ],
    ids=["other_architecture", "missing_keys", "truncated", "code_pickle", "raw_code_pickle"],
)
def test_bad_checkpoint_stops_the_run_before_any_work(
    build, problem: str, tiny_model: SAM2UNet, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = build(tmp_path, tiny_model)
    image = nifti(tmp_path, "case.nii.gz", voxels())
    out = tmp_path / "out"
    code, _ = run_cli(["-i", str(image), "-o", str(out), "-m", str(model)])
    error = capsys.readouterr().err
    assert code == 2
    assert str(model) in error and re.search(problem, error), error
    assert not (tmp_path / "executed").exists()  # the pickled command never ran
    assert list(out.iterdir()) == []


# ------------------------------------------------------------ output folder (own runs)
def test_output_folder_that_cannot_be_written_stops_the_run_before_any_work(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = nifti(tmp_path, "case.nii.gz", voxels())
    taken = tmp_path / "a_file"
    taken.write_text("not a folder")
    for out in (taken, taken / "below"):
        code, events = run_cli(["-i", str(image), "-o", str(out), "-m", str(checkpoint)])
        error = capsys.readouterr().err
        assert code == 2 and events == []
        assert f"cannot write to the output folder {out}" in error
    assert taken.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_stops_the_run_before_any_work(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image = nifti(tmp_path, "case.nii.gz", voxels())
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, _ = run_cli(["-i", str(image), "-o", str(out), "-m", str(checkpoint)])
    finally:
        out.chmod(0o700)
    assert code == 2 and "cannot write to the output folder" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_full_disk_mid_write_keeps_the_previous_output_and_the_batch_goes_on(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NIfTI writer runs out of space half-way through caseA (rerun with --overwrite):
    caseA's previous output is untouched, no partial file stays, caseB is rewritten."""
    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    out.mkdir()
    for index, name in enumerate(("caseA", "caseB")):
        nifti(cases, f"{name}.nii.gz", voxels(seed=index))
        nifti(out, f"{name}.nii.gz", voxels(dtype="uint8", seed=index))  # previous outputs
    previous = (out / "caseA.nii.gz").read_bytes()

    real_write = writers._write_nifti

    def full_disk(volume, path: Path) -> None:
        if "caseA" not in path.name:
            return real_write(volume, path)
        path.write_bytes(b"\x1f\x8b half a gzip stream")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writers, "_write_nifti", full_disk)
    code, events = run_cli(["-i", str(cases), "-o", str(out), "-m", str(checkpoint), "--overwrite"])
    assert code == 1
    error = next(e for e in events if e["event"] == "case_error")
    assert error["case"] == "caseA"
    assert f"cannot write {out / 'caseA.nii.gz'}: No space left on device" in error["error"]
    assert (out / "caseA.nii.gz").read_bytes() == previous
    rewritten = sitk.ReadImage(str(out / "caseB.nii.gz"))  # a label map on caseB's grid now
    assert rewritten.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(rewritten))) <= {0, 1}
    assert not [p for p in out.rglob("*") if p.name.startswith(".partial-")]


# --------------------------------------------------------------------------- security
def test_hostile_dicom_tags_never_reach_file_names(
    checkpoint: Path, tmp_path: Path
) -> None:
    """Output names come from the input's file or folder name, never from DICOM tags: a
    series whose description, patient name and IDs are path-traversal strings is written
    as ``<folder>.dcm`` (DICOM SEG, the format that copies those tags) inside the output
    folder and nowhere else.
    (Names come from :func:`sam2unet_core.io.cases.case_name`; no code path turns a tag
    into a path.)"""
    hostile = "../../etc/sam2unet_x"
    tags = {"SeriesDescription": hostile, "PatientName": hostile, "PatientID": hostile,
            "StudyDescription": hostile, "StudyID": "../x"}
    inputs = tmp_path / "inputs"
    dicom_series(inputs / "scan", list(range(0, 8, 2)), tags=tags)
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.parent.rglob("*sam2unet_x*"))
    code, _ = run_cli(["-i", str(inputs), "-o", str(out), "-m", str(checkpoint), "--format", "dcm"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["predict_summary.json", "scan.dcm"]
    assert set(tmp_path.parent.rglob("*sam2unet_x*")) == before
    assert not Path("/etc/sam2unet_x").exists()
    assert pydicom.dcmread(out / "scan.dcm").PatientName == hostile  # copied as data only


def test_prediction_needs_no_network(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any connection attempt during a run fails the test."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, f"network use at run time: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: refuse(None, a))
    image = nifti(tmp_path, "case.nii.gz", voxels())
    code, events = run_cli(["-i", str(image), "-o", str(tmp_path / "out"), "-m", str(checkpoint)])
    assert code == 0 and events[-1]["ok"] == 1
    assert attempts == []


def test_no_code_path_can_unpickle_a_file() -> None:
    """Every loader of untrusted bytes in the package, the Slicer module and the training
    scripts: torch.load only with weights_only=True, YAML only with safe_load, never
    pickle/dill/joblib loads or numpy object arrays."""
    root = Path(__file__).resolve().parents[1]
    unsafe = re.compile(r"\b(pickle|dill|joblib|cloudpickle|marshal)\.loads?\(|allow_pickle\s*=\s*True"
                        r"|yaml\.(load|unsafe_load|full_load)\(|weights_only\s*=\s*False")
    found = []
    for folder in ("sam2unet_core", "SAM2UNetSlicer", "training"):
        for path in sorted((root / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                calls_torch_load = "torch.load(" in line and "weights_only=True" not in line
                if unsafe.search(line) or (calls_torch_load and "``" not in line):
                    found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert found == []
