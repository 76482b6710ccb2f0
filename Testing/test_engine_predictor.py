"""The slice-wise Predictor with injected predict functions (exact, fast), plus one run of a
real tiny SAM2-UNet. Also the preprocessing helpers and device selection it relies on."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from sam2unet_core.device import autocast_dtype, resolve_device
from sam2unet_core.inference import Predictor
from sam2unet_core.inference.torch_runner import TorchRunner
from sam2unet_core.io import Volume
from sam2unet_core.io.orientation import PLANES, plane_view
from sam2unet_core.metadata import Architecture, ModelMetadata
from sam2unet_core.preprocessing import apply_intensity, fit_intensity, normalize_intensity, stack_slices

SIZE = 32  # model input side; volumes below are 32 x 32 in-plane so resizing is exact


def metadata(num_classes: int = 1, context: int = 0, in_channels: int = 1,
             intensity: dict | None = None) -> ModelMetadata:
    return ModelMetadata(
        architecture=Architecture("hiera_t", num_classes, in_channels),
        input_size=SIZE,
        intensity=intensity or {"kind": "scale", "divisor": 1.0},
        mean=[], std=[], context_slices=context,
    )


def threshold_fn(batch: torch.Tensor) -> torch.Tensor:
    """Logit > 0 exactly where the (centre) input value is > 0.5: pointwise, so labels must
    equal ``input > 0.5`` whatever the slicing."""
    centre = batch[:, batch.shape[1] // 2: batch.shape[1] // 2 + 1]
    return (centre - 0.5) * 100


class Recorder:
    """A predict function that remembers every batch it was given."""

    def __init__(self, fn=threshold_fn) -> None:
        self.batches: list[torch.Tensor] = []
        self.fn = fn

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch.clone())
        return self.fn(batch)


def random_volume(shape_kji=(SIZE, SIZE, SIZE), direction=np.eye(3), seed=0) -> Volume:
    array = np.random.default_rng(seed).random(shape_kji).astype(np.float32)
    return Volume(array, spacing_ijk=(1.0, 1.2, 2.0), origin_lps=(3, 4, 5), direction_lps=direction)


@pytest.mark.parametrize("axis", sorted(PLANES))
def test_labels_match_a_pointwise_model_on_every_axis(axis: str) -> None:
    volume = random_volume(direction=Rotation.from_euler("z", 30, degrees=True).as_matrix())
    predictor = Predictor(TorchRunner(threshold_fn, metadata=metadata(), device="cpu"), batch_size=5)
    labels = predictor.predict(volume, axis=axis).labels
    assert labels.array_kji.dtype == np.uint8
    assert labels.same_grid(volume)
    np.testing.assert_array_equal(labels.array_kji, volume.array_kji > 0.5)


def test_model_sees_the_same_axial_slices_for_lps_and_ras_storage() -> None:
    """One patient stored twice: LPS order (DICOM style) and RAS order (i and j flipped,
    NIfTI style). The engine must hand the model identical slices."""
    lps = random_volume(shape_kji=(4, SIZE, SIZE))
    ras_array = lps.array_kji[:, ::-1, ::-1].copy()  # i -> R, j -> A
    origin = lps.origin_lps + lps.direction_lps @ (lps.spacing_ijk * [SIZE - 1, SIZE - 1, 0])
    ras = Volume(ras_array, lps.spacing_ijk, origin, np.diag([-1.0, -1.0, 1.0]))
    seen = []
    for volume in (lps, ras):
        recorder = Recorder()
        Predictor(TorchRunner(recorder, metadata=metadata(), device="cpu")).predict(volume)
        seen.append(torch.cat(recorder.batches))
    torch.testing.assert_close(seen[0], seen[1])


def test_sagittal_slices_are_taken_across_left_right_whatever_the_array_order() -> None:
    """Array axes permuted (k runs L-R): sagittal slicing must still cut along L-R and
    show rows superior -> inferior."""
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)  # i->P, j->S, k->L
    volume = random_volume(shape_kji=(3, SIZE, SIZE), direction=direction)
    recorder = Recorder()
    Predictor(TorchRunner(recorder, metadata=metadata(), device="cpu")).predict(volume, axis="sagittal")
    batch = torch.cat(recorder.batches)
    assert batch.shape == (3, 1, SIZE, SIZE)
    # slice 0 = k 0 (rightmost); rows = j reversed (superior first); columns = i (A -> P... i is +P)
    expected = torch.from_numpy(volume.array_kji[0, ::-1, :].copy())
    torch.testing.assert_close(batch[0, 0], expected)


@given(
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    plane=st.sampled_from(sorted(PLANES)),
    channels=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_plane_view_round_trips_for_any_direction(angles, plane, channels) -> None:
    direction = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    view = plane_view(direction, plane)
    assert sorted(view.axes) == [0, 1, 2]
    shape = (2, 3, 4, 3) if channels else (2, 3, 4)
    array = np.arange(np.prod(shape)).reshape(shape)
    np.testing.assert_array_equal(view.from_plane(view.to_plane(array)), array)


def test_slice_range_limits_the_slices_in_file_order() -> None:
    volume = random_volume(shape_kji=(10, SIZE, SIZE))
    predictor = Predictor(TorchRunner(threshold_fn, metadata=metadata(), device="cpu"), batch_size=4)
    labels = predictor.predict(volume, slice_range=(3, 7)).labels.array_kji
    np.testing.assert_array_equal(labels[3:7], volume.array_kji[3:7] > 0.5)
    assert not labels[:3].any() and not labels[7:].any()
    # k runs inferior here (view flipped): the range still means file indices 3..6
    flipped = Volume(volume.array_kji, direction_lps=np.diag([1.0, 1.0, -1.0]))
    labels = predictor.predict(flipped, slice_range=(3, 7)).labels.array_kji
    np.testing.assert_array_equal(labels[3:7], volume.array_kji[3:7] > 0.5)
    assert not labels[:3].any() and not labels[7:].any()
    with pytest.raises(ValueError, match="slice range 5:11 is outside the 10 slices"):
        predictor.predict(volume, slice_range=(5, 11))


def test_25d_stacks_neighbours_with_edge_repeat() -> None:
    volume = Volume(np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, SIZE, SIZE)))
    recorder = Recorder()
    predictor = Predictor(TorchRunner(recorder, metadata=metadata(context=1, in_channels=3),
                          device="cpu"), batch_size=2)
    predictor.predict(volume)
    means = torch.cat(recorder.batches).mean(dim=(2, 3))
    torch.testing.assert_close(means, torch.tensor(
        [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]], dtype=torch.float32))


def test_multiclass_argmax_probabilities_and_progress() -> None:
    volume = random_volume(shape_kji=(6, SIZE, SIZE))

    def three_classes(batch: torch.Tensor) -> torch.Tensor:  # class = floor(3 * value)
        centres = torch.tensor([1 / 6, 3 / 6, 5 / 6]).view(1, 3, 1, 1)
        return -((batch - centres) ** 2) * 1000

    calls = []
    predictor = Predictor(TorchRunner(three_classes, metadata=metadata(num_classes=3),
                          device="cpu"), batch_size=4)
    prediction = predictor.predict(volume, probabilities=True,
                                   progress=lambda d, t: calls.append((d, t)))
    labels, probs = prediction.labels, prediction.probabilities
    np.testing.assert_array_equal(labels.array_kji, np.floor(volume.array_kji * 3))
    assert probs.array_kji.shape == (6, SIZE, SIZE, 3) and probs.array_kji.dtype == np.float32
    np.testing.assert_allclose(probs.array_kji.sum(-1), 1.0, atol=1e-5)
    assert calls == [(4, 6), (6, 6)]
    assert set(prediction.times.as_dict()) == {"preprocess", "model", "postprocess"}


def test_many_classes_give_uint16_labels() -> None:
    volume = random_volume(shape_kji=(2, SIZE, SIZE))
    fn = lambda batch: torch.zeros(batch.shape[0], 300, SIZE, SIZE).index_fill_(1, torch.tensor([299]), 1.0)
    labels = Predictor(TorchRunner(fn, metadata=metadata(num_classes=300), device="cpu")).predict(volume).labels
    assert labels.array_kji.dtype == np.uint16 and np.all(labels.array_kji == 299)


@pytest.mark.parametrize("num_classes", [2, 3, 5, 300])
def test_label_rule_equals_argmax_with_ties_and_nan(num_classes: int) -> None:
    """The runner's labels are ``argmax`` over the classes exactly: coarse values make many
    ties (the first maximum wins), NaN pixels (a NaN logit makes every softmax channel NaN;
    one channel alone too) count as the maximum, as ``argmax`` has them."""
    runner = TorchRunner(threshold_fn, metadata=metadata(num_classes=num_classes), device="cpu")
    generator = torch.Generator().manual_seed(num_classes)
    for trial in range(4):
        probs = torch.randint(0, 3, (3, num_classes, 37, 41), generator=generator).float() / 2
        if trial >= 2:  # NaN in every channel of some pixels, and in single channels of others
            pixels = torch.rand(3, 37, 41, generator=generator) < 0.1
            probs.permute(0, 2, 3, 1)[pixels] = float("nan")
            probs[:, trial % num_classes][torch.rand(3, 37, 41, generator=generator) < 0.1] = float("nan")
        expected = probs.argmax(1)
        labels = runner._labels(probs)
        assert labels.shape == expected.shape
        assert torch.equal(labels.long(), expected), f"trial {trial}: {(labels.long() != expected).sum()} differ"


def test_resize_to_model_input_and_back_keeps_the_grid() -> None:
    volume = random_volume(shape_kji=(3, 50, 70))
    volume.array_kji[:] = 0
    volume.array_kji[:, 10:40, 20:60] = 1
    recorder = Recorder()
    labels = Predictor(TorchRunner(recorder, metadata=metadata(), device="cpu")).predict(volume).labels
    assert recorder.batches[0].shape[-2:] == (SIZE, SIZE)
    assert labels.shape_kji == (3, 50, 70)
    rows = np.flatnonzero(labels.array_kji[0].any(axis=1))
    columns = np.flatnonzero(labels.array_kji[0].any(axis=0))
    # 50 x 70 -> 32 x 32 -> 50 x 70 blurs edges by at most one pixel, without shifting them
    assert abs(rows[0] - 10) <= 1 and abs(rows[-1] - 39) <= 1
    assert abs(columns[0] - 20) <= 1 and abs(columns[-1] - 59) <= 1


def test_flip_tta_averages_three_passes() -> None:
    volume = Volume(np.zeros((1, SIZE, SIZE), np.float32))

    def left_half(batch: torch.Tensor) -> torch.Tensor:  # not flip-invariant
        logits = torch.full((batch.shape[0], 1, SIZE, SIZE), -10.0)
        logits[..., : SIZE // 2] = 10.0
        return logits

    recorder = Recorder(left_half)
    predictor = Predictor(TorchRunner(recorder, metadata=metadata(), device="cpu"))
    plain = predictor.predict(volume).labels.array_kji
    assert plain[0, :, : SIZE // 2].all() and not plain[0, :, SIZE // 2:].any()
    recorder.batches.clear()
    probs = predictor.predict(volume, tta=True, probabilities=True).probabilities
    assert len(recorder.batches) == 3
    # left-right flipped pass votes the other way: p = (1 + 0 + 1) / 3 on the left
    np.testing.assert_allclose(probs.array_kji[0, 0, 0], 2 / 3, atol=1e-3)
    np.testing.assert_allclose(probs.array_kji[0, 0, -1], 1 / 3, atol=1e-3)


def test_postprocessing_keeps_largest_component_and_fills_holes() -> None:
    array = np.zeros((8, SIZE, SIZE), np.float32)
    array[1:7, 4:20, 4:20] = 1  # big cube with a hole
    array[3:5, 10:13, 10:13] = 0
    array[2:4, 25:28, 25:28] = 1  # small blob
    volume = Volume(array)
    predictor = Predictor(TorchRunner(threshold_fn, metadata=metadata(), device="cpu"))
    raw = predictor.predict(volume).labels.array_kji
    assert raw[2, 26, 26] == 1 and raw[3, 11, 11] == 0
    cleaned = predictor.predict(volume, postprocess=["largest_component", "fill_holes"]).labels.array_kji
    assert cleaned[2, 26, 26] == 0 and cleaned[3, 11, 11] == 1
    assert cleaned.sum() == 6 * 16 * 16 and cleaned.dtype == np.uint8
    with pytest.raises(ValueError, match="unknown post-processing"):
        predictor.predict(volume, postprocess=["smooth"])


def test_colour_images_feed_rgb_models_with_imagenet_normalisation() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3)).astype(np.uint8)
    meta = dataclasses.replace(metadata(in_channels=3, intensity={"kind": "scale", "divisor": 255.0}),
                               mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    recorder = Recorder()
    Predictor(TorchRunner(recorder, metadata=meta, device="cpu")).predict(Volume(rgb))
    expected = (torch.from_numpy(rgb[0]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(recorder.batches[0][0], expected)


def test_wrong_model_output_and_missing_metadata_are_reported() -> None:
    volume = random_volume(shape_kji=(2, SIZE, SIZE))
    wrong = Predictor(TorchRunner(lambda b: torch.zeros(b.shape[0], 2, SIZE, SIZE),
                                  metadata=metadata(num_classes=3), device="cpu"))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        wrong.predict(volume)
    with pytest.raises(ValueError, match="metadata= with a forward function"):
        Predictor(threshold_fn, device="cpu")
    with pytest.raises(ValueError, match="plane 'oblique'"):
        Predictor(TorchRunner(threshold_fn, metadata=metadata(), device="cpu")).predict(volume, axis="oblique")


def test_real_tiny_sam2unet_runs_through_the_engine(tiny_model) -> None:
    volume = Volume(np.random.default_rng(0).normal(0, 300, (3, 40, 24)).astype(np.int16))
    model = copy.copy(tiny_model)  # a shallow copy on the same weights, with its own metadata
    model.metadata = dataclasses.replace(tiny_model.metadata, input_size=32)
    prediction = Predictor(model, device="cpu", batch_size=2).predict(volume, probabilities=True)
    labels, probs = prediction.labels, prediction.probabilities
    assert labels.shape_kji == (3, 40, 24) and labels.array_kji.dtype == np.uint8
    np.testing.assert_array_equal(labels.array_kji, probs.array_kji > 0.5)
    assert prediction.times.model > 0


def test_intensity_modes() -> None:
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(
        normalize_intensity(hu, {"kind": "ct_window", "center": 40, "width": 400}),
        [0, 0, 0.5, 1, 1])
    ramp = np.arange(1001, dtype=np.float64)
    out = normalize_intensity(ramp, {"kind": "percentile", "lower": 10, "upper": 90})
    np.testing.assert_allclose(out[[0, 100, 500, 900, 1000]], [0, 0, 0.5, 1, 1])
    z = normalize_intensity(ramp, {"kind": "zscore"})
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-3
    np.testing.assert_allclose(normalize_intensity(np.array([255.0]), {"kind": "scale", "divisor": 255}), [1])
    with pytest.raises(ValueError, match="unknown intensity kind"):
        fit_intensity(ramp, {"kind": "histogram"})


@pytest.mark.parametrize("intensity", [{"kind": "zscore"}, {"kind": "scale", "divisor": 10},
                                       {"kind": "ct_window", "center": 0, "width": 100}])
def test_infinite_voxels_read_like_nan_for_every_intensity_kind(intensity: dict) -> None:
    """+-Inf are no measurement, like NaN: they map to 0, not to +-3e38 (unclipped kinds)."""
    values = np.array([np.inf, -np.inf, np.nan, 5.0, -5.0, 20.0])
    mapping = fit_intensity(values, intensity)
    for out in (apply_intensity(values, mapping), apply_intensity(torch.from_numpy(values), mapping).numpy()):
        np.testing.assert_array_equal(out[:3], 0)
        assert np.all(np.isfinite(out))


def test_stack_slices_shapes() -> None:
    grey = np.random.default_rng(0).random((5, 7, 9))
    assert stack_slices(grey, [0, 4], context=0, in_channels=3).shape == (2, 3, 7, 9)
    assert stack_slices(grey, [1], context=2, in_channels=5).shape == (1, 5, 7, 9)
    colour = np.zeros((1, 7, 9, 3))
    assert stack_slices(colour, [0], context=0, in_channels=3).shape == (1, 3, 7, 9)
    with pytest.raises(ValueError, match="cannot feed a model with 2 channels"):
        stack_slices(grey, [0], context=0, in_channels=2)


def test_device_resolution_on_this_machine() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cpu"), training=True) is None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="choose the CPU device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.parametrize("dtype", [">i2", "<u2", ">f4", "u1", "<i4", "f2"])
def test_any_voxel_type_gives_the_same_labels(dtype: str) -> None:
    """Raw values travel to the device in their own type (big-endian and unsigned included)
    and are normalised there."""
    array = np.random.default_rng(0).integers(0, 200, (3, SIZE, SIZE))
    meta = metadata(intensity={"kind": "ct_window", "center": 100, "width": 100})
    predictor = Predictor(TorchRunner(threshold_fn, metadata=meta, device="cpu"))
    labels = predictor.predict(Volume(array.astype(dtype))).labels.array_kji
    np.testing.assert_array_equal(labels, array > 100)


def test_nan_padding_does_not_spoil_percentile_normalisation() -> None:
    """Resampled MR is often NaN outside the field of view: statistics ignore NaN and NaN
    voxels read as the low end (label 0), the rest is segmented as without padding."""
    array = np.random.default_rng(0).random((3, SIZE, SIZE)).astype(np.float32) * 1000
    padded = array.copy()
    padded[:, :, :4] = np.nan
    meta = metadata(intensity={"kind": "percentile", "lower": 0.0, "upper": 100.0})
    predictor = Predictor(TorchRunner(threshold_fn, metadata=meta, device="cpu"))
    labels = predictor.predict(Volume(padded)).labels.array_kji
    assert not labels[:, :, :4].any()
    expected = (padded[:, :, 4:] - np.nanmin(padded)) / (np.nanmax(padded) - np.nanmin(padded)) > 0.5
    np.testing.assert_array_equal(labels[:, :, 4:], expected)
    with pytest.raises(ValueError, match="no finite values"):
        predictor.predict(Volume(np.full((1, SIZE, SIZE), np.nan, np.float32)))


def test_many_2d_images_share_batches_and_match_one_by_one_prediction() -> None:
    rng = np.random.default_rng(0)
    frames = [Volume(rng.integers(0, 256, (1, h, w, 3)).astype(np.uint8)) for h, w in
              [(20, 30), (20, 30), (20, 30), (45, 17), (8, 50), (8, 50)]]
    meta = metadata(num_classes=3, in_channels=3, intensity={"kind": "scale", "divisor": 255.0})

    def brightness_classes(batch: torch.Tensor) -> torch.Tensor:
        centres = torch.tensor([1 / 6, 3 / 6, 5 / 6]).view(1, 3, 1, 1)
        return -((batch.mean(1, keepdim=True) - centres) ** 2) * 1000

    recorder = Recorder(brightness_classes)
    predictor = Predictor(TorchRunner(recorder, metadata=meta, device="cpu"), batch_size=2)
    together = predictor.predict_images(frames, probabilities=True)
    # runner batches hold one frame size: runs of equal sizes share them, up to batch_size
    assert [len(b) for b in recorder.batches] == [2, 1, 1, 2]
    for frame, prediction in zip(frames, together):
        labels, probs = prediction.labels, prediction.probabilities
        alone = predictor.predict(frame).labels
        assert labels.same_grid(frame) and labels.array_kji.dtype == np.uint8
        np.testing.assert_array_equal(labels.array_kji, alone.array_kji)
        assert probs.array_kji.shape == frame.shape_kji + (3,)
    with pytest.raises(ValueError, match="predict_images takes 2D images"):
        predictor.predict_images([random_volume(shape_kji=(2, SIZE, SIZE))])
