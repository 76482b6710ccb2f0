"""The ONNX model of the module's self-test on an install without PyTorch, and the self-test's
behaviour when Slicer's Python lacks what it needs.

``SAM2UNetSlicer/Resources/Testing/selftest_threshold.onnx`` is not a trained SAM2-UNet: it is
a fixed threshold graph (probability = sigmoid(20 (x - 0.5)) of the percentile-mapped slice)
with our metadata, so the self-test can drive the whole ONNX route (describe, device probe,
``sam2unet-predict`` with ONNX Runtime, label import) where torch cannot make a model. Its
metadata says so. ``python Testing/test_slicer_selftest_model.py`` writes it again.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from slicer_fakes import MODULE_DIR
from slicer_module_fakes import installFakeSlicerModules

MODEL = MODULE_DIR / "Resources" / "Testing" / "selftest_threshold.onnx"
THRESHOLD, STEEPNESS = 0.5, 20.0


def selftestMetadata():
    from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

    return ModelMetadata(
        architecture=Architecture("hiera_t", num_classes=1, in_channels=1),
        labels=default_labels(1, ["bright tissue"]), input_size=32,
        intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5}, mean=[], std=[],
        provenance={"source": "self-test", "note": "a fixed threshold graph, not a trained SAM2-UNet: it checks "
                                                   "the module's ONNX route"})


def writeSelftestModel(path: Path) -> Path:
    """The threshold graph: ``slices`` (B, 1, H, W) -> ``probabilities`` (B, 1, H, W)."""
    import onnx
    from onnx import TensorProto, helper

    from sam2unet_core.export.onnx import INPUT_NAME, METADATA_KEY, OUTPUT_NAME

    shape = ["batch", 1, "height", "width"]
    graph = helper.make_graph(
        [helper.make_node("Sub", [INPUT_NAME, "threshold"], ["centred"]),
         helper.make_node("Mul", ["centred", "steepness"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], [OUTPUT_NAME])],
        "selftest_threshold",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, shape)],
        [helper.make_tensor("threshold", TensorProto.FLOAT, [], [THRESHOLD]),
         helper.make_tensor("steepness", TensorProto.FLOAT, [], [STEEPNESS])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sam2unet_core",
                              doc_string="SAM2UNetSlicer self-test: a threshold graph, not a trained network")
    model.ir_version = 8
    model.metadata_props.add(key=METADATA_KEY, value=selftestMetadata().to_json())
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_checked_in_model_is_the_generated_threshold_graph(tmp_path: Path) -> None:
    import onnx

    fresh = writeSelftestModel(tmp_path / "fresh.onnx")
    assert onnx.load(str(MODEL)).SerializeToString() == onnx.load(str(fresh)).SerializeToString()
    assert MODEL.stat().st_size < 2_000


def test_selftest_model_segments_with_onnx_runtime_as_its_rule_says() -> None:
    from sam2unet_core import Predictor
    from sam2unet_core.inference.onnx_runner import OnnxRunner, read_onnx_metadata
    from sam2unet_core.io.volume import Volume

    metadata = read_onnx_metadata(MODEL)
    assert metadata.decoder_trained and "not a trained SAM2-UNet" in metadata.provenance["note"]
    rng = np.random.default_rng(0)
    array = rng.uniform(0, 100, (4, 24, 20)).astype(np.float32)
    prediction = Predictor(OnnxRunner(MODEL, device="cpu")).predict(Volume(array))
    low, high = np.percentile(array, [0.5, 99.5])
    expected = (np.clip((array - low) / (high - low), 0, 1) > THRESHOLD).astype(np.uint8)
    assert (prediction.labels.array_kji == expected).mean() > 0.999


def test_reload_and_test_reports_missing_dependencies_instead_of_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slicer's runTest does not honour skipTest: the self-test must say what is missing and return."""
    installFakeSlicerModules(monkeypatch)
    realFindSpec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("sam2unet_core", "torch", "onnxruntime")
                        else realFindSpec(name, *args))
    module = importlib.import_module("SAM2UNetSlicer")
    test = module.SAM2UNetSlicerTest()
    shown: list[str] = []
    monkeypatch.setattr(test, "delayDisplay", lambda message, *args: shown.append(message), raising=False)
    test.runTest()  # returns, no exception
    [message] = shown
    assert "self-test was not run" in message and "sam2unet_core" in message and "Install dependencies" in message


@pytest.mark.parametrize(("importable", "variant"), [
    ({"sam2unet_core", "torch", "sam2", "onnxruntime"}, "torch"),
    ({"sam2unet_core", "onnxruntime"}, "onnx"),
    ({"sam2unet_core"}, None),
    ({"torch", "onnxruntime"}, None),
])
def test_self_test_variant_follows_what_is_installed(monkeypatch: pytest.MonkeyPatch, importable: set[str],
                                                     variant: str | None) -> None:
    installFakeSlicerModules(monkeypatch)
    module = importlib.import_module("SAM2UNetSlicer")
    assert module.selfTestVariant(lambda name: name in importable)[0] == variant


if __name__ == "__main__":
    print(writeSelftestModel(MODEL))
