"""Fuzz the volume readers and the checkpoint loader with hypothesis, for a set time.

Outside CI (pytest does not collect this file). Usage::

    .venv/bin/python Testing/fuzz/fuzz_inputs.py --target volume --seconds 300
    .venv/bin/python Testing/fuzz/fuzz_inputs.py --target checkpoint --seconds 300
    .venv/bin/python Testing/fuzz/fuzz_inputs.py --target dicom-folder --seconds 300
    .venv/bin/python Testing/fuzz/fuzz_inputs.py --target dicom-seg --seconds 300

Each example takes a valid seed file (NIfTI, also in micron units and with a name that
denies its compression, NRRD, MHA, PNG, DICOM; or one of our
safetensors / a SAM2-UNet .pt state dict; for ``dicom-folder``, one slice of a real
5-slice CT series, read as the folder; for ``dicom-seg`` also written as a DICOM SEG),
mutates its bytes (bit flips, overwrites,
truncation, insertion), and reads it back. The contract under test: a bad file raises
``ValueError`` (``CheckpointError`` is one) naming the file, and nothing else escapes,
hangs or runs code. Any other exception is a finding: it is printed and the offending
file saved under ``--findings`` for a regression test.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors.torch import save_file

from sam2unet_core import ModelMetadata, load_model, read_metadata
from sam2unet_core.io import read_volume
from sam2unet_core.io.writers import write_labels
from sam2unet_core.metadata import default_labels


def volume_seeds(folder: Path) -> list[Path]:
    """Small valid files of every readable kind."""
    rng = np.random.default_rng(0)
    array_ijk = rng.integers(-1000, 1000, size=(12, 10, 6)).astype(np.int16)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    seeds = []
    for name in ("vol.nii.gz", "vol.nii"):
        nib.save(nib.Nifti1Image(array_ijk, affine), folder / name)
        seeds.append(folder / name)
    micron = nib.Nifti1Image(array_ijk, affine)
    micron.header.set_xyzt_units("micron")
    nib.save(micron, folder / "micron.nii")
    seeds.append(folder / "micron.nii")
    # compression that the name denies (read from the bytes, with a warning)
    (folder / "plain.nii.gz").write_bytes((folder / "vol.nii").read_bytes())
    (folder / "packed.nii").write_bytes((folder / "vol.nii.gz").read_bytes())
    seeds += [folder / "plain.nii.gz", folder / "packed.nii"]
    image = sitk.GetImageFromArray(array_ijk.transpose(2, 1, 0))  # IJK -> KJI
    image.SetSpacing((0.8, 0.9, 2.5))
    for name in ("vol.nrrd", "vol.mha"):
        sitk.WriteImage(image, str(folder / name))
        seeds.append(folder / name)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "frame.png")
    seeds.append(folder / "frame.png")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    seeds.append(folder / "ct.dcm")
    return seeds


CT_SERIES = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"


def dicom_folder_seeds(folder: Path) -> list[Path]:
    """The slices of a real CT series; each example damages one of them (``folder`` unused:
    the series is written under the work folder by ``run``)."""
    return sorted(CT_SERIES.iterdir())


def checkpoint_seeds(folder: Path) -> list[Path]:
    """Our safetensors layout and the official .pt layout, with few tensors (fast to read)."""
    state = {"head.weight": torch.randn(1, 64, 1, 1), "encoder.blocks.0.block.norm1.weight": torch.ones(96)}
    ours = folder / "model.safetensors"
    save_file(state, str(ours), metadata={"sam2unet": ModelMetadata().to_json()})
    official = folder / "official.pth"
    torch.save(state, official)
    sam2 = folder / "sam2.pt"
    torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.randn(96, 3, 7, 7)}}, sam2)
    return [ours, official, sam2]


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 2**20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=64)),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op, *args in mutations:
        if not buf:
            break
        if op == "flip":
            pos = args[0] % len(buf)
            buf[pos] ^= 1 << args[1]
        elif op == "set":
            pos = args[0] % len(buf)
            buf[pos : pos + len(args[1])] = args[1]
        elif op == "truncate":
            del buf[int(len(buf) * args[0]) :]
        else:
            pos = args[0] % (len(buf) + 1)
            buf[pos:pos] = args[1]
    return bytes(buf)


def read_checkpoint(path: Path) -> None:
    read_metadata(path)
    load_model(path)


def read_and_write_dicom_seg(folder: Path) -> None:
    """Read the series and write a DICOM SEG of it: the source check (``dicom_seg_sources``)
    and highdicom see the damaged headers; a refusal must be a non-empty ValueError."""
    volume = read_volume(folder)
    labels = volume.with_array(np.ones(volume.shape_kji, np.uint8))
    try:
        write_labels(labels, folder.parent / "seg.dcm", default_labels(2))
    except ValueError as err:
        if not str(err).replace(str(folder), "").strip(" :'\""):
            raise AssertionError(f"empty error text: {err!r}") from err
        raise


def run(target: str, seconds: float, findings: Path) -> int:
    work = Path(tempfile.mkdtemp(prefix="sam2unet-fuzz-"))
    seeds = {"volume": volume_seeds, "checkpoint": checkpoint_seeds,
             "dicom-folder": dicom_folder_seeds, "dicom-seg": dicom_folder_seeds}[target](work)
    reader = {"checkpoint": read_checkpoint,
              "dicom-seg": read_and_write_dicom_seg}.get(target, read_volume)
    seed_bytes = [(p.name, p.read_bytes()) for p in seeds]
    found: dict[str, Path] = {}
    examples = 0
    last_case = work / "case"

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(range(len(seed_bytes))), st.lists(MUTATION, min_size=1, max_size=4))
    def one_batch(seed_index: int, mutations: list[tuple]) -> None:
        nonlocal examples, last_case
        examples += 1
        name, data = seed_bytes[seed_index]
        path = last_case = work / "case" / name
        if target in ("dicom-folder", "dicom-seg"):  # the intact series, one file damaged
            last_case = work / "case" / "series"
            path = last_case / name
            last_case.mkdir(parents=True, exist_ok=True)
            for other, intact in seed_bytes:
                (last_case / other).write_bytes(intact)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(mutate(data, mutations))
        try:
            reader(last_case)
        except ValueError as err:
            if str(last_case) not in str(err) and last_case.name not in str(err):
                raise AssertionError(f"error does not name the file: {err}") from err

    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            one_batch()
        except Exception as group:  # findings: keep them and go on
            errors = group.exceptions if isinstance(group, BaseExceptionGroup) else [group]
            for err in errors:
                key = f"{type(err).__name__}: {str(err)[:120]}"
                if key in found:
                    continue
                findings.mkdir(parents=True, exist_ok=True)
                saved = findings / f"{target}-{len(found):03d}-{last_case.name}"
                if last_case.is_dir():
                    shutil.copytree(last_case, saved)
                else:
                    shutil.copy(last_case, saved)  # the last example hypothesis replayed
                found[key] = saved
                trace = "".join(traceback.format_exception(err, limit=-3))
                print(f"FINDING {key}\n  saved {saved}\n{trace}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"{target}: {examples} examples in {seconds:.0f} s, {len(found)} distinct findings")
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["volume", "checkpoint", "dicom-folder", "dicom-seg"], required=True)
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget (default: 300)")
    parser.add_argument("--findings", type=Path, default=Path("fuzz_findings"),
                        help="folder for files that broke the contract (default: ./fuzz_findings)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("sam2unet_core").setLevel(logging.ERROR)  # name warnings, per example
    return run(args.target, args.seconds, args.findings)


if __name__ == "__main__":
    raise SystemExit(main())
