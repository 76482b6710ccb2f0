"""Smoke tests of the benchmark scripts on a tiny configuration (hiera_t, 64 px, one
iteration): the printed table and the JSON fields exist and hold sane values. No timing is
asserted (the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import randomize_

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def benchmarks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO))
    import benchmarks.bench_model
    import benchmarks.bench_volume
    import benchmarks.common

    return benchmarks


def test_setting_names_parse_and_bad_ones_are_rejected(benchmarks) -> None:
    setting = benchmarks.common.parse_setting("bf16-cl-compile-b8")
    assert (setting.precision, setting.channels_last, setting.compile, setting.batch) == (
        "bf16", True, True, 8)
    assert setting.autocast_dtype is torch.bfloat16
    assert benchmarks.common.parse_setting("tf32").tf32
    for bad in ("fp64", "bf16-fast", "fp32-b0"):
        with pytest.raises(ValueError, match=bad.split("-")[-1]):
            benchmarks.common.parse_setting(bad)


def test_agreement_counts_flipped_pixels(benchmarks) -> None:
    reference = torch.full((1, 1, 4, 4), -1.0)
    reference[..., :2, :2] = 2.0  # 4 foreground pixels
    same = benchmarks.common.agreement(reference.clone(), reference)
    assert same["dice"] == 1.0 and same["max_abs_logit_diff"] == 0.0
    changed = reference.clone()
    changed[0, 0, 0, 0] = -0.5  # one foreground pixel lost
    result = benchmarks.common.agreement(changed, reference)
    assert result["dice"] == pytest.approx(2 * 3 / 7)
    assert result["pixels_differ"] == pytest.approx(1 / 16)
    assert result["max_abs_logit_diff"] == pytest.approx(2.5)


def test_onednn_linear_matches_f_linear_and_is_undone(benchmarks) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    x = torch.randn(2, 7, 8)  # (B, tokens, C): N-D input as in Hiera
    with torch.no_grad():
        expected = model(x)
        with benchmarks.common.onednn_linear(model):
            assert all("forward" in vars(m) for m in model if isinstance(m, torch.nn.Linear))
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model)


def test_bench_model_prints_every_setting_and_writes_json(benchmarks, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.json"
    code = benchmarks.bench_model.main([
        "--backbone", "hiera_t", "--size", "64", "--batch", "2", "--iters", "1", "--repeats", "1",
        "--warmup", "0", "--settings", "fp32-cl-onednn", "bf16deep-cl", "--peak-flops", "1e11",
        "--train", "--train-settings", "fp32", "--train-batch", "2", "--json", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    for field in ("img/s", "x base", "FLOP%", "peak MB", "Dice", "gflop_per_img_forward"):
        assert field in printed
    data = json.loads(out.read_text())
    assert data["header"]["gflop_per_img_forward"] > 0
    rows = {(r["kind"], r["setting"]): r for r in data["results"]}
    assert set(rows) == {("inference", "fp32-b1"), ("inference", "fp32-cl-onednn"),
                         ("inference", "bf16deep-cl"), ("training", "fp32")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["img_per_s"] > 0 and row["peak_memory_mb"] > 0 and 0 < row["flop_fraction"]
    # the baseline is fp32 eager like the reference: identical labels whatever the batch
    baseline = rows[("inference", "fp32-b1")]
    assert baseline["speedup_vs_baseline"] == 1.0
    assert baseline["dice"] == 1.0 and baseline["passed"]
    assert rows[("inference", "fp32-cl-onednn")]["max_abs_logit_diff"] < 1e-3
    assert 0.9 < rows[("inference", "bf16deep-cl")]["dice"] <= 1.0
    training = rows[("training", "fp32")]
    assert training["first_loss_rel_diff"] < 1e-4
    assert training["gflop_per_img"] > data["header"]["gflop_per_img_forward"]


def test_bench_model_rejects_unknown_setting(benchmarks, capsys) -> None:
    assert benchmarks.bench_model.main(["--settings", "fp33"]) == 2
    assert "fp33" in capsys.readouterr().err


def test_bench_volume_reports_each_stage(benchmarks, tmp_path: Path, capsys) -> None:
    out = tmp_path / "volume.json"
    code = benchmarks.bench_volume.main([
        "--backbone", "hiera_t", "--size", "64", "--shape", "48", "40", "3", "--batch-size", "2",
        "--repeats", "1", "--workdir", str(tmp_path / "work"), "--json", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "slices/s" in printed and "model stage" in printed
    data = json.loads(out.read_text())
    (run,) = data["runs"]
    assert run["slices"] == 3
    assert set(run["stages_s"]) == {"setup", "read", "preprocess", "model", "postprocess",
                                    "write", "other"}
    assert run["stages_s"]["model"] > 0 and run["wall_s"] >= run["stages_s"]["model"]
    assert data["summary"]["mixed"]["slices_per_s"] > 0


def test_bench_volume_io_only_times_read_and_write(benchmarks, tmp_path: Path) -> None:
    out = tmp_path / "io.json"
    code = benchmarks.bench_volume.main(["--shape", "32", "24", "4", "--io-only", "--repeats", "1",
                                         "--workdir", str(tmp_path), "--json", str(out)])
    assert code == 0
    io = json.loads(out.read_text())["io"]
    assert io["slices"] == 4 and io["read_s"] > 0 and io["write_s"] > 0
    written = nib.load(tmp_path / "labels.nii.gz")
    assert written.shape == (32, 24, 4)  # the reader/writer round trip keeps the grid


def test_bench_cpu_engine_compares_old_and_new_settings(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path, capsys) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import bench_cpu_engine
    from sam2unet_core.inference import acceleration

    out = tmp_path / "engine.json"
    code = bench_cpu_engine.main(["--slices", "2", "--side", "96", "--size", "64", "--repeats", "2",
                                  "--threads", "1", "--precision", "fp32", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "# new vs old:" in printed and "passes" in printed
    result = json.loads(out.read_text())
    assert [run["setting"] for run in result["runs"]] == ["old", "new", "new", "old"]
    summary = result["summary"]
    assert summary["dice_new_vs_old"] >= 0.999 and 0.0 < summary["foreground_fraction"] < 1.0
    assert summary["old"]["cpu_s_per_slice"] > 0 and summary["speedup_cpu"] > 0
    assert acceleration.prepare_model.__module__ == acceleration.__name__  # the patch is undone


def test_bench_onnx_compares_the_cpu_paths_and_names_the_fastest_agreeing_one(
        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import bench_onnx

    bench_onnx.main(["--size", "64", "--slices", "2", "--rounds", "1", "--threads", "1"])
    printed = capsys.readouterr().out
    table = printed.split("label Dice vs torch fp32\n", 1)[1].split("\n# ", 1)[0].splitlines()
    names = [line[:17].strip() for line in table]
    openvino = ["openvino f32", "openvino bf16"] if bench_onnx._openvino_installed() else []
    assert names == ["torch fp32", "torch auto", "onnxruntime fp32", "onnxruntime int8", "ort int8 8-bit w",
                     *openvino, "default (auto)"]
    assert "# torch auto: cpu: CPU (" in printed and "# machine: " in printed
    assert "# default (auto): " in printed and " backend: auto" in printed
    assert "# default's one-off export: " in printed
    fastest = printed.rsplit("on this CPU: ", 1)[1].splitlines()[0].strip()
    assert fastest in names


def test_bench_input_size_scores_one_model_at_each_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys) -> None:
    """A saved model is scored on the demo's held-out case at every size; a size the model
    cannot take is refused before any prediction, with no result file."""
    from sam2unet_core import SAM2UNet, save_model
    from sam2unet_core.metadata import Architecture, ModelMetadata, default_labels

    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import bench_input_size
    from benchmarks.brain_data import build_brain_dataset

    data = build_brain_dataset(tmp_path / "data", train_cases=1, test_cases=1, resolution_mm=4)
    meta = ModelMetadata(architecture=Architecture("hiera_t", num_classes=3, in_channels=1),
                         labels=default_labels(3, ["grey_matter", "white_matter"]), input_size=64,
                         intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5}, mean=[], std=[])
    checkpoint = save_model(randomize_(SAM2UNet("hiera_t", num_classes=3, in_channels=1)),
                            tmp_path / "model.safetensors", meta)
    result = tmp_path / "sizes.json"
    common = [str(checkpoint), "--data", str(data), "--work", str(tmp_path / "work"), "--json", str(result)]
    assert bench_input_size.main([*common, "--sizes", "32", "64"]) == 0
    rows = json.loads(result.read_text())["rows"]
    assert [(r["checkpoint_input_size"], r["input_size"]) for r in rows] == [(64, 32), (64, 64)]
    assert all(0.0 <= r["Dice_1"] <= 1.0 and 0.0 <= r["Dice_2"] <= 1.0 and r["infer_cpu_s_per_slice"] > 0
               for r in rows)
    assert "at   32 px" in capsys.readouterr().out
    result.unlink()
    with pytest.raises(SystemExit) as refused:
        bench_input_size.main([*common, "--sizes", "64", "48"])
    assert refused.value.code == 2 and "--sizes 48" in capsys.readouterr().err
    assert not result.exists()


def test_bench_io_compares_two_trees_and_checks_the_label_files(tmp_path: Path, capsys) -> None:
    """This checkout against itself, tiny inputs: every figure of both trees, ratios, and the
    old/new label files compared (identical here)."""
    from benchmarks import bench_io

    result = tmp_path / "io.json"
    code = bench_io.main(["--old", str(bench_io.REPO), "--repeats", "1", "--measure", "io", "ct",
                          "--ct-shape", "40", "32", "6", "--cases", "0", "--workdir", str(tmp_path / "work"),
                          "--json", str(result)])
    assert code == 0
    summary = json.loads(result.read_text())["summary"]
    assert summary["outputs_identical"] is True
    for figure in ("read_s", "write_s", "model_s", "load_s", "growth_mb"):
        assert summary["ct"]["old"][figure] >= 0 and summary["ct"]["new"][figure] >= 0
    assert summary["io"]["new"]["decoded_mb"] == pytest.approx(40 * 32 * 6 * 2 / 2**20)
    assert "## io" in capsys.readouterr().out


def test_bench_quality_trains_a_learning_curve_with_a_seed_spread(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path, capsys) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import bench_quality

    out = tmp_path / "quality.json"
    code = bench_quality.main([
        "--models", "basicunet-small", "--steps", "1", "2", "--cnn-steps", "2", "3", "--seeds", "0", "1",
        "--train-cases", "3", "--test-cases", "1", "--resolution-mm", "4", "--work", str(tmp_path / "work"),
        "--json", str(out), "--cnn-set", "data.input_size=64", "augment.train_size=0", "augment.crop_size=0",
        "data.samples_per_epoch=16"])
    assert code == 0
    report = json.loads(out.read_text())
    runs = [(r["budget_steps"], r["seed"], r["steps"]) for r in report["models"].values()]
    # the first seed at every budget, the second at the middle one; each run stops at its box
    assert runs == [(2, 0, 2), (3, 0, 3), (3, 1, 3)]
    (spread,) = report["seed_spread"].values()
    assert spread["seeds"] == [0, 1] and spread["Dice_1_range"] >= 0
    assert "seeds [0, 1] at basicunet-small 3 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # unpaired budgets are refused before any training
        bench_quality.main(["--steps", "1", "2", "--cnn-steps", "2"])
