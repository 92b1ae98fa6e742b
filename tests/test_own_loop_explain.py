"""Explaining a bad step of your own PyTorch loop: `guard.step(losses, replay=fn, ids=ids)`.

A small classifier with BatchNorm (no detector), batches of 6 samples with string ids. Each fault gives
the verdict a user would want, names the right sample, is written in the incident line, and the replay
leaves the training exactly as it would have been without it (bit-identical weights at the end).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nanguard.backends.torch.guard import Guard
from nanguard.config import ExplainConfig, GuardConfig
from nanguard.guard import IncidentLog, PolicyConfig
from torch_helpers import small_net

NAN = float("nan")
STEPS = 12


def train(tmp_path, *, poison_at=None, transient_at=None, spike_at=None, replay=True, steps=STEPS,
          explain=None, fused=True):
    """Train `steps` steps; return (outcomes, the model's final state, the incident lines)."""
    torch.manual_seed(0)
    model = nn.Sequential(small_net(), nn.Dropout(0.3)).train()  # dropout: the replay draws from torch's RNG
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=fused)
    log = IncidentLog(tmp_path / f"incidents-{replay}.jsonl")
    guard = Guard(model, optimizer, incident_log=log, explain=explain,
                  config=GuardConfig(spike_window=6, spike_min_history=3),
                  policy=PolicyConfig(max_skip_fraction=1.0, snapshot_every=4, snapshot_healthy=1, snapshot_confirm=1))
    generator = torch.Generator().manual_seed(1)
    outcomes = []
    for step in range(steps):
        images = torch.randn(6, 3, 8, 8, generator=generator)
        labels = torch.randint(0, 3, (6,), generator=generator)
        if step == poison_at:
            images[4, 1, 2:5, 3] = NAN  # one sample's pixels
        ids = [f"img-{step}-{i}" for i in range(6)]

        def losses_of(index, images=images, labels=labels):
            return {"loss": nn.functional.cross_entropy(model(images[index]), labels[index])}

        losses = losses_of(list(range(6)))
        if step == transient_at:  # a fault of this run only (a flaky device): the replay is clean
            losses = {"loss": losses["loss"] * NAN}
        if step == spike_at:  # an LR blow-up for one update
            for group in optimizer.param_groups:
                group["lr"] = 5.0e4
        outcomes += guard.step(losses, **(dict(replay=losses_of, ids=ids) if replay else {}))
        if step == spike_at:
            for group in optimizer.param_groups:
                group["lr"] = 0.05
    outcomes += guard.flush()
    lines = [json.loads(line) for line in log.path.read_text().splitlines()] if log.path.exists() else []
    return outcomes, {"rng": torch.get_rng_state(), **{k: v.clone() for k, v in model.state_dict().items()}}, lines


def diagnosed(outcomes):
    return [(o.observation.step, o.diagnosis) for o in outcomes if o.diagnosis is not None]


def test_one_sample_with_nan_pixels_is_named_and_the_replay_changes_nothing(tmp_path):
    outcomes, state, lines = train(tmp_path, poison_at=5)
    [(step, diagnosis)] = diagnosed(outcomes)
    assert step == 5 and diagnosis.verdict == "bad_image" and diagnosis.reproduced
    assert diagnosis.image_ids == ["img-5-4"] and diagnosis.module is None
    assert diagnosis.phase == "data" and "non-finite pixel" in " ".join(diagnosis.evidence)
    [line] = lines
    assert line["step"] == 5 and line["diagnosis"]["verdict"] == "bad_image"
    assert line["diagnosis"]["image_ids"] == ["img-5-4"] and line["image_ids"][4] == "img-5-4"
    # the same loop without replay=: the same skip, no diagnosis, bit-identical weights and RNG at the end
    plain_outcomes, plain_state, plain_lines = train(tmp_path, poison_at=5, replay=False)
    assert not diagnosed(plain_outcomes) and "diagnosis" not in plain_lines[0]
    assert [o.decision.action for o in plain_outcomes] == [o.decision.action for o in outcomes]
    for name, tensor in plain_state.items():
        assert torch.equal(tensor, state[name]), name


def test_a_fault_the_replay_does_not_reproduce_is_transient(tmp_path):
    outcomes, _, lines = train(tmp_path, transient_at=6)
    [(step, diagnosis)] = diagnosed(outcomes)
    assert step == 6 and diagnosis.verdict == "transient" and diagnosis.reproduced is False
    assert lines[0]["diagnosis"]["verdict"] == "transient"


def test_an_lr_blow_up_is_lr_divergence(tmp_path):
    outcomes, _, _ = train(tmp_path, spike_at=4)
    verdicts = {diagnosis.verdict for _, diagnosis in diagnosed(outcomes)}
    assert verdicts == {"lr_divergence"}, diagnosed(outcomes)


def test_explain_settings_are_honoured(tmp_path):
    """auto=off diagnoses nothing; steps older than the ring are not replayed; keep bounds the states."""
    outcomes, _, _ = train(tmp_path, poison_at=5, explain=ExplainConfig(auto="off"))
    assert not diagnosed(outcomes)
    outcomes, _, _ = train(tmp_path, poison_at=5, explain=ExplainConfig(keep=0))
    assert not diagnosed(outcomes)
    outcomes, _, _ = train(tmp_path, poison_at=5, fused=False)  # the copy-and-restore update path
    assert [d.verdict for _, d in diagnosed(outcomes)] == ["bad_image"]


def test_replay_without_ids_is_refused_and_a_broken_replay_is_named(tmp_path):
    torch.manual_seed(0)
    model = small_net()
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    losses = {"loss": model(torch.randn(2, 3, 8, 8)).sum()}
    with pytest.raises(ValueError, match="ids="):
        guard.step(losses, replay=lambda index: losses)

    def broken(index):
        raise KeyError("the loader's batch is gone")

    outcomes = guard.step({"loss": model(torch.randn(2, 3, 8, 8)).sum() * NAN}, replay=broken, ids=["a", "b"])
    [outcome] = [o for o in outcomes + guard.flush() if o.diagnosis is not None]
    assert outcome.decision.action == "skip" and outcome.diagnosis.verdict == "unknown"
    assert "KeyError" in outcome.diagnosis.evidence[0] and "replay=fn must return" in outcome.diagnosis.advice


def test_a_model_that_cannot_run_one_sample_alone_still_names_it(tmp_path):
    """BatchNorm1d in training mode refuses a batch of one: each sample is judged by its input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).train()
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    outcomes = []
    for step in range(4):
        x, y = torch.randn(6, 5), torch.randint(0, 2, (6,))
        if step == 2:
            x[3, 1] = float("inf")

        def losses_of(index, x=x, y=y):
            return {"loss": nn.functional.cross_entropy(model(x[index]), y[index])}

        outcomes += guard.step(losses_of(list(range(6))), replay=losses_of, ids=[f"row{step}.{i}" for i in range(6)])
    [(step, diagnosis)] = diagnosed(outcomes + guard.flush())
    assert step == 2 and diagnosis.verdict == "bad_image" and diagnosis.image_ids == ["row2.3"]


def test_tensor_ids_from_a_data_loader_name_the_sample(tmp_path):
    """A DataLoader gives the ids as a tensor: the diagnosis and the incident line hold plain ints."""
    torch.manual_seed(0)
    model = small_net().train()
    log = IncidentLog(tmp_path / "incidents.jsonl")
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.05), incident_log=log)
    outcomes = []
    for step in range(5):
        images, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
        if step == 2:
            images[1] = float("nan")

        def losses_of(index, images=images, labels=labels):
            return {"loss": nn.functional.cross_entropy(model(images[index]), labels[index])}

        outcomes += guard.step(losses_of(list(range(4))), replay=losses_of, ids=torch.arange(4) + 10 * step)
    [(step, diagnosis)] = diagnosed(outcomes + guard.flush())
    assert (step, diagnosis.verdict, diagnosis.image_ids) == (2, "bad_image", [21])
    [line] = [json.loads(text) for text in log.path.read_text().splitlines()]
    assert line["diagnosis"]["image_ids"] == [21] and line["image_ids"] == [20, 21, 22, 23]
