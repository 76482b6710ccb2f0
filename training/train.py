"""Train SAM2-UNet: ``python training/train.py --config training/configs/polyp.yaml [key=value ...]``.

A thin script run by path; the logic lives in ``sam2unet_core.train`` (this folder is not a
package: ``sam2`` installs a top-level package named ``training``). Same as ``sam2unet-train``.
"""

from sam2unet_core.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
