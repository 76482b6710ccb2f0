"""Training configs: the shipped YAML files load, overrides parse as YAML, mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from sam2unet_core.train.config import load_config, read_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def test_paper_recipe_is_the_default_and_in_the_polyp_config() -> None:
    config = load_config(CONFIGS / "polyp.yaml")
    optim = config.optim
    assert (optim.lr, optim.weight_decay, optim.min_lr, optim.epochs, optim.batch_size) == (1e-3, 5e-4, 1e-7, 20, 12)
    assert config.data.input_size == 352 and config.augment.flip_prob == 0.5
    assert config.model.backbone == "hiera_l" and config.data.mean == [0.485, 0.456, 0.406]
    defaults = load_config(None, ["data.root=x"])
    assert defaults.optim == optim and defaults.run.amp == "auto"


@pytest.mark.parametrize("name", ["msd.yaml", "demo_brain_cpu.yaml"])
def test_shipped_volume_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name, ["data.root=somewhere"])
    assert config.data.kind == "volume" and config.data.context_slices == 1


def test_a_config_extends_a_packaged_recipe_and_overrides_it(tmp_path: Path) -> None:
    demo = load_config(CONFIGS / "demo_brain_cpu.yaml", ["data.root=x", "run.max_steps=50"])
    recipe = read_recipe("volumes_from_scratch")
    assert demo.model.window_spec == recipe["model"]["window_spec"] and demo.data.input_size == 224
    assert recipe["augment"]["flip_prob"] == 0.0 and demo.augment.flip_prob == 0.5  # the file over the recipe
    assert demo.run.max_steps == 50  # the overrides over the file
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("extends: volumes_from_scrach\ndata: {root: x}\n")
    with pytest.raises(ValueError, match=r"no packaged recipe named 'volumes_from_scrach'; recipes: "
                                         r"\['volumes_from_scratch', 'volumes_sam2_frozen'\]"):
        load_config(wrong)


def test_overrides_are_yaml_values() -> None:
    config = load_config(CONFIGS / "polyp.yaml", ["optim.epochs=3", "augment.multiscale=[0.75, 1, 1.25]",
                                                  "data.intensity={kind: ct_window, center: 40, width: 400}"])
    assert config.optim.epochs == 3 and config.augment.multiscale == [0.75, 1, 1.25]
    assert config.data.intensity == {"kind": "ct_window", "center": 40, "width": 400}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.epoch=3"], r"unknown config keys \['optim.epoch'\]"),
        (["optim.epochs"], "not of the form section.key=value"),
        (["data.input_size=100"], "multiple of 32"),
        (["data.kind=video"], "data.kind must be"),
        (["data.cache=ram"], "data.cache must be"),
        (["data.root="], "data.root is not set"),
        (["optim.schedule=budget"], "needs a time box"),
        (["optim.schedule=linear"], "optim.schedule must be"),
        (["run.max_steps=-1"], "run.max_steps must be >= 0"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps must be"),
        (["optim.aux_loss_weights=[1]"], "two weights"),
        (["optim.aux_loss_weights=[1, -1]"], "two weights"),
        (["augment.crop_size=100"], "augment.crop_size must be a multiple of 32"),
        (["augment.crop_size=352"], r"augment.crop_size must be a multiple of 32 below the training side \(.*352\)"),
        (["augment.crop_size=256", "augment.train_size=224"], r"below the training side \(.*224\)"),
        (["augment.train_size=300"], "augment.train_size must be 0 .* a multiple of 32"),
        (["model.drop_path_rate=1"], r"model.drop_path_rate must be in \[0, 1\)"),
        (["model.window_spec=[8, 4, 6]"], "model.window_spec must be empty or four window sides"),
        (["model.full_res_channels=-1"], "model.full_res_channels must be 0"),
        (["model.window_spec=[8, 4, 6, 3]", "model.sam2_checkpoint=sam2_hiera_large.pt"],
         "model.window_spec .* is for training from scratch"),
    ],
)
def test_mistakes_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "polyp.yaml", overrides)
