"""Shared fixtures: a small generated dataset and tiny configs, so the suite stays within minutes on a
2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One compute thread per process: `make test` runs two workers on two cores, and the trainings they
# start are processes of their own; OpenMP threads beyond the cores spin and slow everything down.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = Path(os.environ.get("NANGUARD_COCO_TINY", REPO.parent / "shared" / "data" / "coco_tiny"))

# A tiny Faster R-CNN on 64-px images.
TINY = [
    "model.min_size=64", "model.max_size=64", "model.rpn_pre_nms_top_n_train=100",
    "model.rpn_post_nms_top_n_train=50", "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=30",
    "model.box_batch_size_per_image=32", "train.batch_size=2", "train.warmup_steps=2", "train.log_every=1",
    "data.prefetch=1", "eval.batch_size=8", "train.threads=1",
    "explain.auto=off",  # replaying incidents is explain's tests' business; they turn it on
]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """24 train + 8 val generated images at 64 px (3 classes)."""
    from nanguard.data.synth import generate

    root = tmp_path_factory.mktemp("shapes")
    generate(root, images=24, val_images=8, size=64, classes=3, seed=1, progress=False)
    return root


@pytest.fixture(scope="session")
def coco_tiny() -> Path:
    if not (COCO_TINY / "annotations" / "instances_train2017.json").exists():
        pytest.skip(f"real COCO images not found at {COCO_TINY} (set NANGUARD_COCO_TINY)")
    return COCO_TINY


def tiny_args(root: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", *TINY, *extra]


def checkpoint_steps(run: Path) -> list[int]:
    from nanguard.run.checkpoints import list_checkpoints

    return [step for step, _ in list_checkpoints(run)]


def newest_checkpoint(run: Path) -> dict:
    """The newest checkpoint of a run, flattened for tests: the backend's parts (model, optimizer,
    schedule, scaler, guard, rng) beside data, config, category_ids and step."""
    from nanguard.backends.torch.checkpoint import load_checkpoint
    from nanguard.run.checkpoints import list_checkpoints

    return flat_checkpoint(load_checkpoint(list_checkpoints(run)[-1][1]))


def flat_checkpoint(state: dict) -> dict:
    """A torch run's checkpoint, flattened for tests: the backend's parts (model, optimizer, schedule,
    scaler, rng; `guard` holds its device-side spike windows and the policy's state) beside data, config,
    category_ids and step."""
    return {**state["backend"], "guard": {**state["backend"]["guard"], **state["guard"]}, "data": state["data"],
            "config": state["config"], "category_ids": state["category_ids"], "step": state["run"]["step"]}


@pytest.fixture
def fake_backend(monkeypatch):
    """`nanguard train/eval` in this process build the numpy `FakeBackend` (tests/fake_backend.py)
    instead of a framework's: run-level behaviour without training a detector. Returns the backends
    built, in order."""
    import nanguard.run.backend as backends
    from fake_backend import FakeBackend

    built: list = []

    def create(name: str, device):
        built.append(FakeBackend(device))
        return built[-1]

    monkeypatch.setattr(backends, "create_backend", create)
    return built


# The modules that take longest (trainings, compiles, launches), longest first: `make test` runs them
# first, so that its two workers (`-n 2 --dist loadscope`) finish together instead of one waiting on
# the other's last long module. An order only: every test runs either way.
LONGEST_FIRST = ("test_mindspore_backend", "test_distributed", "test_mindspore_model", "test_train",
                 "test_benchmarks_smoke", "test_benchmarks_smoke_mindspore", "test_mindspore_step",
                 "test_benchmarks_smoke_distributed", "test_explain", "test_e2e_guard", "test_kill9")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
