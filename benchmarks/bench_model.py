"""Speed of SAM2-UNet inference and training steps, each optimised setting beside the fp32
eager batch-1 baseline measured in the same run, and checked against fp32 eager output.

For each setting it prints img/s, the fraction of the FLOP limit (FLOPs per image counted
with ``torch.utils.flop_counter.FlopCounterMode``), the peak memory, the speed-up over the
baseline and the agreement with fp32 eager output on the same input (Dice of the label maps,
which must be >= 0.999, and the largest absolute logit difference).

Settings are names ``<precision>[-cl][-compile][-b<N>]``: precision fp32 (strict, no TF32),
tf32, bf16 or fp16 (autocast of the whole model), bf16deep or fp16deep (autocast of Hiera
stages 3-4 only; patch embedding, stages 1-2 and decoder in fp32); ``cl`` channels_last;
``onednn`` fp32 linear layers through oneDNN instead of MKL on CPU (see RESULTS.md); ``compile`` torch.compile; ``b<N>``
batch N instead of ``--batch``. SDPA (fused attention) is always on: sam2's Hiera calls
``F.scaled_dot_product_attention``.

CPU (default, a few minutes on 2 cores)::

    python benchmarks/bench_model.py --train

H100, the issue's settings::

    python benchmarks/bench_model.py --device cuda --backbone hiera_l --size 352 \\
        --batch 64 --train --train-batch 48 --json h100.json

With random weights the head is fitted by ridge regression to a synthetic phantom so that
the label maps are not trivially constant (``--checkpoint`` benchmarks a trained model).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    H100_BF16_PEAK_FLOPS,
    Setting,
    agreement,
    deep_stage_autocast,
    fit_head,
    machine_description,
    measure_matmul_flops,
    onednn_linear,
    parse_setting,
    peak_memory_bytes,
    phantom_batch,
    reset_peak_memory,
    synchronize,
    time_calls,
)
from sam2unet_core import SAM2UNet, load_model  # noqa: E402
from sam2unet_core.device import resolve_device  # noqa: E402
from sam2unet_core.inference.acceleration import cpu_has_native_bf16  # noqa: E402

__all__ = ["main", "run_inference", "run_training", "count_flops", "DICE_REQUIRED"]

LOGGER = logging.getLogger(__name__)
DICE_REQUIRED = 0.999
BASELINE = "fp32-b1"
DEFAULT_SETTINGS = {
    "cpu": [BASELINE, "fp32", "fp32-cl", "fp32-cl-onednn", "bf16deep-cl-onednn", "bf16-cl"],
    "cuda": [BASELINE, "fp32", "tf32-cl", "bf16-cl", "fp16-cl", "bf16deep-cl", "bf16-cl-compile",
             "fp16-cl-compile"],
}
DEFAULT_TRAIN_SETTINGS = {
    "cpu": ["fp32", "bf16-cl"],
    "cuda": ["fp32", "tf32-cl", "bf16-cl", "bf16-cl-compile"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--backbone", default="hiera_t", help="hiera_t, hiera_s, hiera_b+, hiera_l")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="benchmark this model file instead of random weights")
    parser.add_argument("--num-classes", type=int, default=1)
    parser.add_argument("--size", type=int, default=352, help="input side in pixels (multiple of 32)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch of the optimised settings (default: 64 on CUDA, 4 on CPU)")
    parser.add_argument("--settings", nargs="+", default=None,
                        help=f"inference settings (default on CPU: {DEFAULT_SETTINGS['cpu']}; "
                             f"on CUDA: {DEFAULT_SETTINGS['cuda']}); {BASELINE} is always run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per setting")
    parser.add_argument("--iters", type=int, default=2, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per setting (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. max-autotune (CUDA graphs) or reduce-overhead")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help=f"FLOP/s limit (default: {H100_BF16_PEAK_FLOPS:.3g} on CUDA, the H100 "
                             "bf16 peak; on CPU measured: one-thread bf16 and fp32 matmul rates "
                             "times the thread count)")
    parser.add_argument("--train", action="store_true", help="also benchmark training steps")
    parser.add_argument("--train-settings", nargs="+", default=None,
                        help=f"training settings (default on CPU: {DEFAULT_TRAIN_SETTINGS['cpu']}; "
                             f"on CUDA: {DEFAULT_TRAIN_SETTINGS['cuda']})")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="training batch (default: 12 on CUDA, as the official train.py; 2 on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    return parser


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention) by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _peak_flops(args: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    if args.peak_flops is not None:
        return args.peak_flops, "given (--peak-flops)"
    if device.type == "cuda":
        return H100_BF16_PEAK_FLOPS, "H100 bf16 dense peak (790 TFLOP/s, measured; the issue's limit)"
    fp32 = measure_matmul_flops(device, torch.float32)
    threads = torch.get_num_threads()
    if not cpu_has_native_bf16():  # emulated bf16 is slower than fp32: not a limit, and slow to time
        return fp32, (f"measured here: 2048^3 fp32 matmul on one thread x {threads} threads, "
                      f"{fp32 / 1e9:.0f} GFLOP/s (no native bf16 on this CPU)")
    bf16 = measure_matmul_flops(device, torch.bfloat16)
    return max(fp32, bf16), (f"measured here: 2048^3 matmul on one thread x "
                             f"{threads} threads, fp32 {fp32 / 1e9:.0f} GFLOP/s, "
                             f"bf16 {bf16 / 1e9:.0f} GFLOP/s; the larger is the limit")


@contextlib.contextmanager
def _configured(model: nn.Module, setting: Setting, device: torch.device,
                compile_mode: str | None = None) -> Iterator[Callable[[torch.Tensor], object]]:
    """Set TF32 flags, memory format and precision of ``setting``; yield the function to call
    (the model, maybe compiled, under autocast). The model is restored on exit."""
    torch.backends.cuda.matmul.allow_tf32 = setting.tf32
    torch.backends.cudnn.allow_tf32 = setting.tf32
    dtype = setting.autocast_dtype
    deep_only = dtype is not None and setting.deep_only
    model.to(memory_format=torch.channels_last if setting.channels_last else torch.contiguous_format)
    with contextlib.ExitStack() as stack:
        if deep_only:
            stack.enter_context(deep_stage_autocast(model, device.type, dtype))
        if setting.onednn:
            stack.enter_context(onednn_linear(model))
        if setting.compile:
            torch._dynamo.reset()
        fn = torch.compile(model, mode=compile_mode) if setting.compile else model
        whole_model = dtype is not None and not deep_only

        def call(x: torch.Tensor) -> object:
            with torch.autocast(device.type, dtype=dtype, enabled=whole_model):
                return fn(x)
        try:
            yield call
        finally:
            model.to(memory_format=torch.contiguous_format)


def _prepare_input(images: torch.Tensor, setting: Setting, batch: int, device: torch.device
                   ) -> torch.Tensor:
    x = images[:batch].to(device)
    return x.contiguous(memory_format=torch.channels_last) if setting.channels_last else x


def _result(kind: str, setting: Setting, batch: int, seconds: tuple[list[float], list[float]],
            flops_per_image: float, peak_flops: float, device: torch.device) -> dict:
    wall, cpu = seconds
    img_per_s = batch / statistics.median(wall)
    peak, peak_kind = peak_memory_bytes(device)
    return {
        "kind": kind, "setting": setting.name, "batch": batch,
        "img_per_s": img_per_s, "seconds_per_batch": wall,
        "cpu_seconds_per_img": statistics.median(cpu) / batch,
        "flop_fraction": img_per_s * flops_per_image / peak_flops,
        "peak_memory_mb": peak / 2**20, "memory_kind": peak_kind,
    }


def run_inference(model: nn.Module, images: torch.Tensor, settings: list[Setting],
                  args: argparse.Namespace, device: torch.device, flops_per_image: float,
                  peak_flops: float) -> list[dict]:
    """Time each setting on ``images[:batch]`` ``(B, C, H, W)`` and compare its output with
    fp32 eager output on the same images. Failures of one setting are reported, not raised."""
    model.eval()
    reference = _fp32_reference(model, images, args.batch, device)
    rows = []
    for setting in settings:
        batch = setting.batch or args.batch
        LOGGER.info("inference %s, batch %d", setting.name, batch)
        try:
            configured = _configured(model, setting, device, args.compile_mode)
            with configured as call, torch.inference_mode():
                x = _prepare_input(images, setting, batch, device)
                reset_peak_memory(device)
                # first call: compiles; copied out before CUDA graphs reuse its memory
                output = call(x).float().cpu()
                seconds = time_calls(lambda: call(x), device, args.warmup, args.iters, args.repeats)
            row = _result("inference", setting, batch, seconds, flops_per_image, peak_flops, device)
            row.update(agreement(output, reference[:batch]))
            row["passed"] = row["finite"] and row["dice"] >= DICE_REQUIRED
        except Exception as err:  # noqa: BLE001 - e.g. torch.compile without a compiler
            LOGGER.warning("setting %s failed: %s", setting.name, err)
            row = {"kind": "inference", "setting": setting.name, "batch": batch,
                   "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
    return rows


@torch.inference_mode()
def _fp32_reference(model: nn.Module, images: torch.Tensor, batch: int, device: torch.device
                    ) -> torch.Tensor:
    """Strict fp32 eager logits of ``images`` (CPU tensor), computed ``batch`` at a time."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    outputs = [model(chunk.to(device)).float().cpu() for chunk in images.split(batch)]
    return torch.cat(outputs)


def run_training(model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                 settings: list[Setting], args: argparse.Namespace, device: torch.device,
                 peak_flops: float) -> list[dict]:
    """Time training steps with the paper's recipe (frozen trunk + adapters, AdamW lr 1e-3,
    weight decay 5e-4; fused AdamW) on ``images`` ``(B, C, H, W)`` / ``masks`` ``(B, 1, H, W)``.
    Each setting starts from the same weights; its first-step loss is compared with fp32."""
    from sam2unet_core.train.losses import DeepSupervisionLoss  # imports MONAI: only when training

    loss_fn = DeepSupervisionLoss(model.architecture.num_classes)
    # kept on the host so that it does not count in the peak GPU memory
    initial = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    model.train()
    batch = args.train_batch
    x_ref, y = images[:batch].to(device), masks[:batch].to(device)

    def forward_loss(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> torch.Tensor:
        return loss_fn(fn(x), y[: x.shape[0]])

    flops_per_image = count_flops(lambda: forward_loss(model, x_ref[:1]).backward())
    model.zero_grad(set_to_none=True)
    model.load_state_dict(initial)  # the counting pass updated the BN statistics
    with torch.no_grad():
        reference_loss = forward_loss(model, x_ref).item()
    rows = []
    for setting in settings:
        batch_s = setting.batch or batch
        LOGGER.info("training %s, batch %d", setting.name, batch_s)
        model.load_state_dict(initial)
        try:
            with _configured(model, setting, device, args.compile_mode) as call:
                x = _prepare_input(images, setting, batch_s, device)
                y_s = masks[:batch_s].to(device)
                params = [p for p in model.parameters() if p.requires_grad]
                optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4, fused=True)

                def step() -> torch.Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(call(x), y_s)
                    loss.backward()
                    optimizer.step()
                    return loss

                reset_peak_memory(device)
                first_loss = step().item()
                seconds = time_calls(step, device, args.warmup, args.iters, args.repeats)
            row = _result("training", setting, batch_s, seconds, flops_per_image, peak_flops, device)
            row["loss"] = "DeepSupervisionLoss (sam2unet_core.train.losses)"
            if batch_s == batch:
                row["first_loss_rel_diff"] = abs(first_loss - reference_loss) / abs(reference_loss)
        except Exception as err:  # noqa: BLE001 - report and go on with the next setting
            LOGGER.warning("training setting %s failed: %s", setting.name, err)
            row = {"kind": "training", "setting": setting.name, "batch": batch_s,
                   "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
    synchronize(device)
    model.load_state_dict(initial)
    model.eval()
    for row in rows:
        row["gflop_per_img"] = flops_per_image / 1e9
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"{'kind':<9} {'setting':<18} {'batch':>5} {'img/s':>9} {'x base':>7} {'FLOP%':>6} "
          f"{'cpu s/img':>9} {'peak MB':>9} {'Dice':>8} {'max|dlogit|':>11} ok")
    for row in rows:
        if "error" in row:
            print(f"{row['kind']:<9} {row['setting']:<18} {row['batch']:>5} FAILED: {row['error']}")
            continue
        ratio = row["speedup_vs_baseline"]
        dice = f"{row['dice']:.5f}" if "dice" in row else "-"
        diff = f"{row['max_abs_logit_diff']:.3g}" if "dice" in row else (
            f"loss {row['first_loss_rel_diff']:.1e}" if "first_loss_rel_diff" in row else "-")
        ok = ("yes" if row["passed"] else "NO") if "passed" in row else "-"
        print(f"{row['kind']:<9} {row['setting']:<18} {row['batch']:>5} {row['img_per_s']:>9.2f} "
              f"{ratio:>7.2f} {100 * row['flop_fraction']:>6.2f} {row['cpu_seconds_per_img']:>9.3f} "
              f"{row['peak_memory_mb']:>9.0f} "
              f"{dice:>8} {diff:>11} {ok}")


def _load(args: argparse.Namespace, device: torch.device) -> tuple[SAM2UNet, str]:
    if args.checkpoint is not None:
        model = load_model(args.checkpoint, device="cpu")
        return model.to(device).eval(), f"checkpoint {args.checkpoint}"
    torch.manual_seed(0)
    model = SAM2UNet(args.backbone, num_classes=args.num_classes).to(device).eval()
    images, masks = phantom_batch(4, model.architecture.in_channels, args.size, seed=1)
    fit_head(model, images.to(device), masks.to(device))
    return model, "random weights, head fitted to a synthetic phantom"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        device = resolve_device(args.device)
        settings = [parse_setting(s) for s in (args.settings or DEFAULT_SETTINGS[device.type])]
        train_settings = [parse_setting(s) for s in
                          (args.train_settings or DEFAULT_TRAIN_SETTINGS[device.type])]
    except (ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (64 if device.type == "cuda" else 4)
    args.train_batch = args.train_batch or (12 if device.type == "cuda" else 2)
    if BASELINE not in [s.name for s in settings]:
        settings.insert(0, parse_setting(BASELINE))

    model, weights = _load(args, device)
    in_channels = model.architecture.in_channels
    largest = max([s.batch or args.batch for s in settings]
                  + ([s.batch or args.train_batch for s in train_settings] if args.train else []))
    images, masks = phantom_batch(largest, in_channels, args.size, seed=2)
    with torch.inference_mode():
        flops_per_image = count_flops(lambda: model(images[:1].to(device)))
    peak_flops, peak_source = _peak_flops(args, device)

    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(device), "torch": torch.__version__,
        "backbone": model.architecture.backbone, "size": args.size, "weights": weights,
        "gflop_per_img_forward": flops_per_image / 1e9, "peak_flops": peak_flops,
        "peak_flops_source": peak_source, "flop_limit_img_per_s": peak_flops / flops_per_image,
        "command": " ".join(sys.argv if argv is None else ["bench_model.py", *argv]),
    }
    for key, value in header.items():
        print(f"# {key}: {value}")

    rows = run_inference(model, images, settings, args, device, flops_per_image, peak_flops)
    if args.train:
        rows += run_training(model, images, masks, train_settings, args, device, peak_flops)
    baseline = next((r["img_per_s"] for r in rows if r["setting"] == BASELINE and "img_per_s" in r),
                    float("nan"))
    for row in rows:
        if "img_per_s" in row:
            row["speedup_vs_baseline"] = row["img_per_s"] / baseline
    _print_table(rows)
    failed = [r["setting"] for r in rows if r.get("passed") is False]
    errors = [f"{r['kind']} {r['setting']}" for r in rows if "error" in r]
    print(f"# correctness (Dice >= {DICE_REQUIRED} vs fp32 eager): "
          + ("all passed" if not failed else f"FAILED for {failed}")
          + (f"; settings that did not run: {errors}" if errors else ""))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
