"""Configs: YAML -> dataclasses, typed key=value overrides, clear errors, and every shipped config loads."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from metaldefect.config import Config, apply_overrides, from_dict, load_config, save_config
from metaldefect.errors import ConfigError
from metaldefect.models.heads import head_class

SHIPPED = sorted((REPO_ROOT / "configs").rglob("*.yaml"))


def write(tmp_path: Path, raw: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_yaml_and_overrides_become_typed_values(tmp_path):
    path = write(tmp_path, {"data": {"root": "data"}, "train": {"lr": 0.01, "epochs": 5}})
    cfg = load_config(path, ["train.lr=1e-3", "train.epochs=7", "train.frozen=false", "data.classes=[a, b]",
                             "model.head_kwargs.num_slots=11", "model.head_kwargs.matching=hungarian"])
    assert cfg.name == "exp"  # defaults to the file's stem
    assert cfg.train.lr == pytest.approx(0.001) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 7 and cfg.train.frozen is False
    assert cfg.data.classes == ["a", "b"]
    assert cfg.model.head_kwargs == {"num_slots": 11, "matching": "hungarian"}
    assert cfg.data.split == [0.7, 0.2, 0.1]  # the paper's default split


def test_integer_given_for_a_float_is_accepted():
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=0.1"], "train.lrr: unknown key"),
    (["train.lr=fast"], "train.lr: expected float"),
    (["train.epochs=2.5"], "train.epochs: expected int"),
    (["train.frozen=maybe"], "train.frozen: expected bool"),
    (["train.optimizer=rmsprop"], "train.optimizer: 'rmsprop' is not one of"),
    (["train.augment=[rotate]"], "train.augment[0]: 'rotate'"),
    (["data.split=[0.5, 0.2, 0.1]"], "data.split: expected three"),
    (["data.classes=crazing"], "data.classes: expected a list"),
    (["model.head_kwargs=3"], "model.head_kwargs: expected a mapping"),
    (["train.epochs=0"], "train.epochs: must be positive"),
    (["train.tune_blocks=2", "train.frozen=false"], "train.tune_blocks: must be >= 0, and is for train.frozen=true"),
    (["train.backbone_lr=0"], "train.backbone_lr: must be positive or null"),
    (["lr"], "expected key=value"),
    (["train.lr.x=1"], "train.lr.x: 'lr' is not a section"),
])
def test_bad_values_name_the_key(tmp_path, overrides, message):
    path = write(tmp_path, {"train": {"lr": 0.01}})
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    assert message in str(error.value)


def test_bad_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(write(tmp_path, {"name": "x", "model": {"head": "slots", "head_kwargs": {"num_slots": 4}}}),
                      ["train.augment=[]", "data.classes=[b, a]"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert isinstance(again, Config)


def test_apply_overrides_leaves_the_input_alone():
    raw = {"train": {"lr": 0.1}}
    changed = apply_overrides(raw, ["train.lr=0.2"])
    assert raw == {"train": {"lr": 0.1}} and changed == {"train": {"lr": 0.2}}


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO_ROOT)) for p in SHIPPED])
def test_every_shipped_config_loads_and_names_real_head_options(path):
    cfg = load_config(path)
    options = set(inspect.signature(head_class(cfg.model.head).__init__).parameters)
    if cfg.model.head == "dense_ensemble":  # its other options go to every member, a dense head
        options |= set(inspect.signature(head_class("dense").__init__).parameters)
    options -= {"self", "in_dims", "num_classes", "options"}
    assert set(cfg.model.head_kwargs) <= options, f"{path}: unknown head options"
    assert cfg.name == path.stem  # run directory names follow the file names
    assert cfg.description, f"{path}: say what the experiment is"


def test_the_paper_experiments_each_have_a_config():
    names = {p.stem for p in (REPO_ROOT / "configs" / "paper").glob("*.yaml")}
    assert len(names) >= 8


def test_a_config_that_starts_from_another_run_shares_its_model():
    """``train.init_from`` loads another run's weights: its model settings must be the same."""
    for path in SHIPPED:
        cfg = load_config(path)
        if cfg.train.init_from:
            source = load_config(REPO_ROOT / "configs" / f"{Path(cfg.train.init_from).name}.yaml")
            assert cfg.model == source.model and cfg.data == source.data, path
