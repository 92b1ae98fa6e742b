"""Replaying a bad step, framework-free: the order of the experiments and the facts they give.

A backend's replayer (torch: `backends/torch/replay.py`, your own torch loop: `loop_replay.py`,
MindSpore: `backends/mindspore/replay.py`) runs the step; `replay_facts` decides what to run and turns
the runs into `ReplayFacts` for `nanguard.explain.verdict.judge`. A replayer has

    count                  the samples (images) of the batch
    can_change_amp         whether it can run the step in float32 instead of its mixed precision
    run(state, images=None, amp=None, judge_spikes=True) -> Run
                           the step (forward, loss, backward) from a model state, on all samples or
                           those at positions `images`
    locate(state) -> (forward OpSite | None, backward OpSite | None)
                           where the first non-finite value appeared
    sample(i, run) -> ImageFacts
                           sample i after its run alone: its ids, its input's values, its boxes

The helpers below (pixels, boxes, the state's elements) work on numpy arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nanguard.explain.verdict import ImageFacts, ReplayFacts


class Run:
    """The numbers of one run of the step from a state."""

    def __init__(self, losses: dict[str, float], grad_norm: float, spike: bool, error: str | None = None,
                 buffers_finite: bool = True) -> None:
        self.losses, self.grad_norm, self.spike, self.error = losses, grad_norm, spike, error
        self.buffers_finite = buffers_finite

    @property
    def nonfinite(self) -> bool:
        return self.error is not None or not self.buffers_finite or not math.isfinite(self.grad_norm) \
            or not all(math.isfinite(v) for v in self.losses.values())

    @property
    def bad(self) -> bool:
        return self.nonfinite or self.spike

    def key(self) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in self.losses.items())) + (repr(self.grad_norm), self.error)


def replay_facts(replayer, state: Any, *, weights: dict[str, np.ndarray], reference: Any = None,
                 reference_weights: dict[str, np.ndarray] | None = None, reference_step: int | None = None,
                 amp: str = "off", replays: int = 2, param_abs_max: float = 1.0e4) -> ReplayFacts:
    """The facts of a bad step. `state`: what the step ran with, as the replayer loads it; `weights`:
    its model parameters and buffers as arrays (the state's facts); `reference`: the newest confirmed
    older state (and its weights, and the step it was taken after)."""
    runs = [replayer.run(state) for _ in range(max(1, replays))]
    first = runs[0]
    facts = ReplayFacts(
        replays=len(runs), reproduced=all(run.bad for run in runs),
        same_every_time=len({run.key() for run in runs}) == 1,
        losses=first.losses, grad_norm=first.grad_norm,
        nonfinite_components=[name for name, value in first.losses.items()
                              if name != "total_loss" and not math.isfinite(value)],
        spike=first.spike, amp=amp, error=first.error)
    state_facts(facts, weights, reference_weights, reference_step, param_abs_max)
    if not facts.reproduced:
        return facts
    if first.nonfinite:
        facts.forward, facts.backward = replayer.locate(state)
    if reference is not None and not (facts.state_nonfinite or facts.state_wild):
        facts.reference_ok = not replayer.run(reference).bad
    if facts.amp != "off" and replayer.can_change_amp:  # float32 makes the same non-finite value? (a spike alone is not AMP's doing)
        full = replayer.run(state, amp="off")
        facts.full_precision_ok = not (full.nonfinite if first.nonfinite else full.bad)
    bad_state = facts.state_nonfinite or facts.state_wild  # the verdict is the state's: no image is to blame
    if (first.nonfinite or not facts.reference_ok) and not bad_state:  # a spike the older state shares: the images
        facts.images = image_facts(replayer, state)
    return facts


def image_facts(replayer, state: Any) -> list[ImageFacts]:
    """Each image (sample) alone, forward and backward: whether it fails, and what its input holds."""
    facts = [replayer.sample(i, replayer.run(state, images=[i], judge_spikes=False)) for i in range(replayer.count)]
    losses = sorted(f.loss_alone for f in facts if f.loss_alone is not None and math.isfinite(f.loss_alone))
    median = losses[(len(losses) - 1) // 2] if losses else math.nan
    for one in facts:
        loss = one.loss_alone
        if not one.fails_alone and loss is not None and math.isfinite(loss) and len(losses) > 2 and loss > 10 * median:
            one.fails_alone = True  # it alone carries the spike
        if not one.fails_alone:
            one.bad_boxes = []  # the boxes of the images to blame only
    return facts


def state_facts(facts: ReplayFacts, weights: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None,
                reference_step: int | None, bound: float) -> None:
    """Non-finite / absurd elements of the state the step ran with, and how far the healthy rest of it
    moved from the older state (a flipped bit moves one element; an LR blow-up, all of them)."""
    reference = reference or {}
    moved, norm = 0.0, 0.0
    for name, values in weights.items():
        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.floating):
            continue
        values = values.astype(np.float64, copy=False)
        finite = np.isfinite(values)
        with np.errstate(invalid="ignore", over="ignore"):
            wild_mask = finite & (np.abs(values) > bound)
        nonfinite, wild = int((~finite).sum()), int(wild_mask.sum())
        if nonfinite or wild:
            facts.state_nonfinite += nonfinite
            facts.state_wild += wild
            facts.state_tensors.append(name)
        old = reference.get(name)
        if old is not None and np.shape(old) == values.shape:
            old = np.asarray(old, np.float64)
            sane = finite & ~wild_mask & np.isfinite(old)
            moved += float(np.square(np.where(sane, values - old, 0.0)).sum())
            norm += float(np.square(np.where(sane, old, 0.0)).sum())
    if reference:
        facts.reference_step = int(reference_step) if reference_step is not None else None
        facts.weight_change = math.sqrt(moved) / max(math.sqrt(norm), 1e-12)


def pixel_facts(pixels: np.ndarray) -> tuple[int, float]:
    """(non-finite values, standard deviation of the finite ones) of an image or any model input."""
    pixels = np.asarray(pixels, np.float64)
    finite = np.isfinite(pixels)
    kept = pixels[finite]
    return int((~finite).sum()), float(kept.std(ddof=1)) if kept.size > 1 else math.nan


def absurd_boxes(height: int, width: int, boxes, annotation_ids: list) -> list[tuple[Any, str]]:
    """Boxes ([N, 4] xyxy) that survived the host's check (finite, positive size) but cannot be real:
    far outside the `height` x `width` image, or thousands of times wider than tall."""
    found = []
    for j, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4).tolist()):
        ann = annotation_ids[j] if j < len(annotation_ids) else None
        w, h = x2 - x1, y2 - y1
        if x2 < -width or y2 < -height or x1 > 2 * width or y1 > 2 * height or w > 4 * width or h > 4 * height:
            found.append((ann, f"box {x1:.4g},{y1:.4g},{x2:.4g},{y2:.4g} far outside the {width}x{height} image"))
        elif w > 0 and h > 0 and max(w / h, h / w) > 1000:
            found.append((ann, f"box {w:.4g}x{h:.4g} px: aspect ratio over 1000"))
    return found
