"""--statistics and --qc-png of sam2unet-predict (sam2unet_core.statistics, sam2unet_core.qc)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam2unet_core.io import read_volume
from sam2unet_core.io.volume import Volume
from sam2unet_core.metadata import default_labels
from sam2unet_core.qc import qc_image
from sam2unet_core.statistics import label_statistics

from test_onnx_runner import _predict, case  # noqa: F401 - the module fixture


def test_label_statistics_on_a_known_box() -> None:
    image = Volume(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), spacing_ijk=np.array([0.5, 1.0, 2.0]))
    labels_array = np.zeros((4, 5, 6), np.uint8)
    labels_array[1:3, 2:5, 0:2] = 1  # k 1..2, j 2..4, i 0..1
    labels = Volume(labels_array, spacing_ijk=image.spacing_ijk)
    first, second = label_statistics(labels, image, default_labels(3))
    assert first["voxels"] == 12 and first["volume_ml"] == pytest.approx(12 * 1.0 / 1000)
    assert first["intensity_mean"] == pytest.approx(image.array_kji[labels_array == 1].mean())
    assert first["intensity_std"] == pytest.approx(image.array_kji[labels_array == 1].std())
    assert first["bbox_min_ijk"] == [0, 2, 1] and first["bbox_max_ijk"] == [1, 4, 2]
    assert first["bbox_size_mm"] == [1.0, 3.0, 4.0]
    assert second["voxels"] == 0 and second["bbox_min_ijk"] is None and second["intensity_mean"] is None


def test_qc_image_overlays_the_label_colour_through_the_centre() -> None:
    image = Volume(np.zeros((9, 10, 11), np.float32))
    labels_array = np.zeros((9, 10, 11), np.uint8)
    labels_array[6:9, 1:4, 7:10] = 1
    infos = default_labels(2)
    picture = qc_image(Volume(labels_array), image, infos)
    assert picture.shape == (10, 11 + 2 + 11 + 2 + 10 + 2, 3)  # (J, I), (K, I), (K, J) panels and picture.dtype == np.uint8
    colour = np.array(infos[0].color) * 0.5
    assert np.allclose(picture[2, 8], colour, atol=1)  # axial slice k=7, row j=2, column i=8
    assert np.allclose(picture[0, 0], 0)


def test_predict_writes_statistics_and_qc_png(case, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    _predict(case["onnx"], case["image"], out, "--statistics", "--qc-png", no_torch=True)
    labels = read_volume(out / "phantom.nii.gz")
    image = read_volume(case["image"])
    records = json.loads((out / "phantom.statistics.json").read_text())
    inside = labels.array_kji == 1
    assert records[0]["label"] == 1
    assert records[0]["voxels"] == int(inside.sum()) > 0
    assert records[0]["volume_ml"] == pytest.approx(inside.sum() * 0.8 * 0.8 * 2.0 / 1000, rel=1e-6)
    assert records[0]["intensity_mean"] == pytest.approx(float(image.array_kji[inside].mean()), rel=1e-5)
    rows = list(csv.DictReader((out / "phantom.statistics.csv").open()))
    assert int(rows[0]["voxels"]) == records[0]["voxels"]
    picture = np.asarray(Image.open(out / "phantom.qc.png"))
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.std() > 0
