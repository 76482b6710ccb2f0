"""``make demo``: build a small MRI dataset from nilearn's MNI152 template, train a small
SAM2-UNet on it, predict held-out cases, print their Dice and write PNG overlays.

A thin script run by path (``python training/demo.py [--out demo_output] [key=value ...]``);
the logic lives in ``sam2unet_core.demo``.
"""

from pathlib import Path

from sam2unet_core.demo import main

if __name__ == "__main__":
    import sys

    config = Path(__file__).resolve().parent / "configs" / "demo_brain_cpu.yaml"
    raise SystemExit(main(["--config", str(config), *sys.argv[1:]]))
