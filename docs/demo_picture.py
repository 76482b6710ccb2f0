"""Write ``docs/demo_brain_result.png``, the README's picture and the extension's screenshot,
from a finished ``make demo`` run: its overlay of one held-out case (image, ground truth,
SAM2-UNet prediction) with a caption that names what it shows and the case's Dice.

    python docs/demo_picture.py DEMO_OUTPUT [--case brain_008] [-o docs/demo_brain_result.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = "DejaVuSans.ttf"  # ships with matplotlib, and with most Linux desktops


def caption_lines(demo: Path, case: str) -> list[str]:
    """What the picture shows, with the case's Dice from the demo's evaluation."""
    summary = json.loads((demo / "evaluation" / "summary.json").read_text(encoding="utf-8"))
    scores = next(entry for entry in summary["cases"] if entry["case"] == case)
    return [
        f"Real result of make demo: SAM2-UNet (Hiera-T, trained from scratch on a CPU) on held-out case {case}",
        f"grey matter (red) Dice {scores['Dice_1']:.3f}, white matter (green) Dice {scores['Dice_2']:.3f}; "
        "left: MR image, middle: ground truth, right: prediction",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="output folder of make demo (demo_output)")
    parser.add_argument("--case", default="brain_008", help="held-out case to show")
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("demo_brain_result.png"))
    args = parser.parse_args(argv)
    overlay = Image.open(args.demo / f"overlay_{args.case}.png").convert("RGB")
    try:
        font = ImageFont.truetype(FONT, 14)
    except OSError:
        import matplotlib

        font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / FONT), 14)
    lines = caption_lines(args.demo, args.case)
    strip = 12 + 22 * len(lines)
    picture = Image.new("RGB", (overlay.width, overlay.height + strip), (24, 24, 24))
    picture.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(picture)
    for n, line in enumerate(lines):
        draw.text((8, overlay.height + 8 + 22 * n), line, fill=(240, 240, 240), font=font)
    picture = picture.quantize(colors=128, method=Image.Quantize.MEDIANCUT)  # a small PNG
    picture.save(args.output, optimize=True)
    print(f"{args.output}: {picture.width} x {picture.height}, {args.output.stat().st_size / 1000:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
