from pathlib import Path

import pytest

from nanguard.config import PRESETS, config_from_dict, dump_yaml, load_config
from nanguard.errors import UserError


def test_presets_resolve():
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.train.steps > 0
    assert load_config("coco_r50").model.name == "resnet50_fpn"
    assert load_config("coco_r50").train.amp == "bf16"


def test_overrides_are_typed():
    cfg = load_config("demo", ["train.lr=0.01", "train.amp=bf16", "guard.enabled=false", "inject=[loss_nan@3]",
                               "policy.backoff_after=5", "model.weights=null"])
    assert cfg.train.lr == 0.01 and cfg.train.amp == "bf16" and cfg.guard.enabled is False
    assert cfg.inject == ["loss_nan@3"] and cfg.policy.backoff_after == 5 and cfg.model.weights is None


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("trian.lr=1", "did you mean 'train.lr'"),
    ("train.amp=fp8", "choose one of off, bf16, fp16"),
    ("train.steps=ten", "train.steps='ten' is not an integer"),
    ("train.lr=nan", "train.lr"),
    ("train.batch_size=0", "train.batch_size=0 must be > 0"),
    ("policy.backoff_factor=2", "policy.backoff_factor"),
    ("guard.enabled=maybe", "not a boolean"),
    ("train.lr", "is not KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(UserError) as err:
        load_config("demo", [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_file_and_round_trip(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\nmodel:\n  name: tiny\n")
    cfg = load_config(str(path))
    assert cfg.train.steps == 7
    import yaml

    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)), "saved")
    assert again == cfg


def test_bad_yaml_files(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainn:\n  steps: 3\n")
    with pytest.raises(UserError, match="did you mean 'train'"):
        load_config(str(unknown))
    with pytest.raises(UserError, match="no such file or preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_data_keys_must_come_together():
    with pytest.raises(UserError, match="set all four"):
        load_config("demo", ["data.train_ann=a.json"])
