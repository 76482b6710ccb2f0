"""``python -m sam2unet_core.cli.worker``: sam2unet-predict runs, one per stdin line, in one
process: the same outputs and events as the command, the model loaded once, bad requests
answered without stopping, and an exit of its own when idle or when stdin closes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from sam2unet_core.cli.predict import main as predict_main

REPO = Path(__file__).resolve().parents[1]


def ct(path: Path, seed: int) -> Path:
    data = np.random.default_rng(seed).integers(-1000, 1000, size=(40, 36, 5)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    return path


def request(argv: list[str]) -> str:
    return json.dumps({"argv": argv}) + "\n"


def test_runs_share_one_model_and_match_the_command(grey_ct_checkpoint: Path, tmp_path: Path, capsys) -> None:
    inputs = [ct(tmp_path / f"case{i}_0000.nii.gz", i) for i in range(2)]
    common = ["-m", str(grey_ct_checkpoint), "--device", "cpu", "--progress", "jsonl"]
    lines = [request(["-i", str(inputs[0]), "-o", str(tmp_path / "w0"), *common]),
             "not json\n",
             request(["-i", str(inputs[1]), "-o", str(tmp_path / "w1"), "--batch-size", "2", *common]),
             request(["-i", str(inputs[1]), "-o", str(tmp_path / "w2"), "--axis", "diagonal", *common])]
    done = subprocess.run([sys.executable, "-m", "sam2unet_core.cli.worker", "--idle-timeout", "60"],
                          input="".join(lines), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr  # stdin closed: it exits
    out = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    finished = [line["returncode"] for line in out if line.get("worker") == "finished"]
    assert finished == [0, 2, 0, 2]  # bad request and bad --axis answered, the worker went on
    events = [line for line in out if "event" in line]
    assert [e["event"] for e in events if e["event"] in ("start", "done")] == ["start", "done"] * 2
    assert "not a worker request" in done.stderr and "--axis" in done.stderr
    assert done.stderr.count("loaded for this and later runs") == 1  # one model load for both runs
    for index, folder in enumerate(("w0", "w1")):  # the same labels as the command's own run
        assert predict_main(["-i", str(inputs[index]), "-o", str(tmp_path / f"cli{index}"), *common]) == 0
        name = f"case{index}.nii.gz"
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / folder / name).dataobj),
                                      np.asarray(nib.load(tmp_path / f"cli{index}" / name).dataobj))
    capsys.readouterr()


def test_an_idle_worker_says_so_and_exits() -> None:
    process = subprocess.Popen([sys.executable, "-m", "sam2unet_core.cli.worker", "--idle-timeout", "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out = process.stdout.readline()
        assert json.loads(out) == {"worker": "idle_exit", "seconds": 1.0}
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()
