"""Evaluate predictions: ``python training/evaluate.py --pred DIR --gt DIR``.

A thin script run by path; the logic lives in ``sam2unet_core.evaluation`` (this folder is
not a package: ``sam2`` installs a top-level package named ``training``). Same as
``sam2unet-evaluate``.
"""

from sam2unet_core.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
