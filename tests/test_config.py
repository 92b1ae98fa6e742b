import os
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
    ("train.batch_size=0", "train.batch_size=0 must be in (0, 4096]"),
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
    with pytest.raises(UserError, match="not a valid config at line 2"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainn:\n  steps: 3\n")
    with pytest.raises(UserError, match="did you mean 'train'"):
        load_config(str(unknown))
    with pytest.raises(UserError, match="no such file or preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_a_config_is_refused_for_what_yaml_would_accept_silently_or_expand_without_end(tmp_path: Path):
    """A key given twice (YAML keeps the last without a word), an alias bomb (nine lines, a billion
    nodes), a FIFO or /dev/zero as the file (a read that blocks or never ends), a huge file, and a huge
    value in a message: each one line, before anything is read past what a config can be."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  steps: 5\n  steps: 7\n")
    with pytest.raises(UserError, match="at line 3: the key 'steps' given twice; keep one"):
        load_config(str(twice))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text('a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n'
                    + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh"))
                    + "train: *h\n")
    with pytest.raises(UserError, match=r"at line 2: an alias \(\*a\); write the value out"):
        load_config(str(bomb))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # nothing ever writes to it: reading it would wait forever
    for special in (fifo, Path("/dev/zero")):
        with pytest.raises(UserError, match="not a regular file"):
            load_config(str(special))
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(UserError, match="larger than 1,048,576 bytes"):
        load_config(str(huge))
    with pytest.raises(UserError) as err:
        load_config("demo", ["train.steps=[" + ", ".join(["1"] * 100_000) + "]"])
    assert len(str(err.value)) < 200 and "..." in str(err.value)


def test_data_keys_must_come_together():
    with pytest.raises(UserError, match="set all four"):
        load_config("demo", ["data.train_ann=a.json"])


@pytest.mark.parametrize("override, expected", [
    # crashed inside torch
    ("train.threads=-1", "train.threads=-1 must be in [0, 1024]"),
    ("train.momentum=-1", "train.momentum=-1.0 must be in [0, 1)"),
    ("train.momentum=1", "train.momentum=1.0 must be in [0, 1)"),
    ("model.fpn_channels=0", "model.fpn_channels=0 must be in (0, 4096]"),
    ("eval.batch_size=0", "eval.batch_size=0 must be in (0, 4096]"),
    # accepted silently but wrong
    ("train.weight_decay=-1", "train.weight_decay=-1.0 must be >= 0"),
    ("eval.max_images=-1", "eval.max_images=-1 must be >= 0"),
    ("model.box_batch_size_per_image=0", "model.box_batch_size_per_image=0 must be in (0, 100000]"),
    # the rest of the numeric keys
    ("seed=-1", "seed=-1"),
    ("model.min_size=8", "model.min_size=8 must be in [32, 4096]"),
    ("model.representation_size=0", "model.representation_size"),
    ("model.rpn_pre_nms_top_n_train=0", "model.rpn_pre_nms_top_n_train"),
    ("model.rpn_post_nms_top_n_test=-5", "model.rpn_post_nms_top_n_test"),
    ("model.box_detections_per_img=0", "model.box_detections_per_img"),
    ("model.box_score_thresh=1.5", "model.box_score_thresh=1.5 must be in [0, 1)"),
    ("data.synth_images=0", "data.synth_images"),
    ("data.synth_size=8", "data.synth_size=8 must be in [32, 4096]"),
    ("data.synth_classes=9", "data.synth_classes=9 must be in [1, 8]"),
    ("data.synth_seed=-2", "data.synth_seed"),
    ("data.synth_val_images=0", "data.synth_val_images=0 leaves nothing"),
    ("data.prefetch=-1", "data.prefetch"),
    ("train.lr=-0.1", "train.lr=-0.1 must be > 0"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio=2.0 must be in [0, 1]"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("guard.param_abs_max=0", "guard.param_abs_max"),
    ("guard.spike_window=0", "guard.spike_window"),
    ("guard.spike_threshold=0", "guard.spike_threshold"),
    ("guard.spike_min_ratio=0.5", "guard.spike_min_ratio=0.5 must be >= 1"),
    ("guard.clip_norm=-1", "guard.clip_norm"),
    # the upper bounds: an extra zero or six refused before anything is allocated
    ("model.min_size=100000", "model.min_size=100000 must be in [32, 4096]"),
    ("data.synth_size=100000", "data.synth_size=100000 must be in [32, 4096]"),
    ("data.prefetch=100000000", "data.prefetch=100000000 must be in [0, 64]"),
    ("explain.replays=1000000000", "explain.replays=1000000000 must be in [1, 100]"),
    ("explain.ring=100000", "explain.ring=100000 must be in [2, 64]"),
    ("train.batch_size=1000000", "train.batch_size=1000000 must be in (0, 4096]"),
    ("model.rpn_pre_nms_top_n_train=10000000", "model.rpn_pre_nms_top_n_train=10000000 must be in (0, 100000]"),
])
def test_every_numeric_key_has_a_range(override, expected):
    with pytest.raises(UserError) as err:
        load_config("demo", [override])
    assert expected in str(err.value)


def test_edges_of_the_ranges_are_accepted():
    cfg = load_config("demo", ["train.momentum=0", "train.weight_decay=0", "eval.max_images=0", "train.threads=0",
                               "guard.clip_norm=0", "model.box_score_thresh=0", "train.min_lr_ratio=1",
                               "data.synth_val_images=0", "train.eval_at_end=false"])
    assert cfg.train.momentum == 0.0


def test_refused_config_writes_no_run_folder(tmp_path, capsys):
    from nanguard.cli import main

    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), "train.threads=-1"]) == 2
    assert "train.threads=-1" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()


@pytest.mark.parametrize("override", ["data.synth_images=10", "data.synth_seed=4", "data.cache=/tmp/elsewhere"])
def test_generated_dataset_keys_are_refused_with_named_data(override):
    with pytest.raises(UserError, match="has no effect with data.root"):
        load_config("demo", ["data.root=/some/folder", override])
    with pytest.raises(UserError, match="has no effect with data.train_ann"):
        load_config("demo", ["data.train_ann=a.json", "data.train_images=a", "data.val_ann=b.json",
                             "data.val_images=b", override])
    load_config("demo", [override])  # the generated dataset: they mean something


def test_train_help_lists_every_key_and_each_listed_value_is_a_valid_override(capsys):
    """`nanguard train --help` ends with every config key and its demo value, written as an override
    is: each line, given back as KEY=VALUE, is accepted and leaves the config as it was."""
    from nanguard.cli import main
    from nanguard.config import _all_keys

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out.split("config keys (KEY=VALUE)")[1].splitlines()[1:]
    pairs = [line.strip() for line in listed if line.strip()]
    demo = load_config("demo")
    assert [p.split("=", 1)[0] for p in pairs] == _all_keys(demo)
    assert load_config("demo", pairs) == demo
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("nanguard ")
