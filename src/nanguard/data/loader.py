"""A deterministic, replayable batch loader (framework-free: both backends use it).

The order of epoch `e` is a permutation drawn from `rng([seed, e])`; augmentation of image `i` in epoch
`e` from `rng([seed, e, i])`. So a batch is a pure function of (seed, epoch, position, quarantine at the
start of the epoch), which is what makes three things possible:
- exact resume: the cursor goes into the checkpoint, and a resumed run sees exactly the batches it
  would have seen;
- replay: `BatchSampler.keys_at(epoch, position)` rebuilds any past batch for diagnosis;
- skipping a window after a rollback: `skip(n)` moves the cursor on without loading anything.
Quarantined samples leave the order from the next epoch on (never mid-epoch, so positions stay stable).
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from nanguard.data.coco import CocoIndex


@dataclass(frozen=True)
class BatchKey:
    epoch: int
    position: int  # batch number within the epoch
    indices: tuple[int, ...]  # record indices in CocoIndex


@dataclass
class Batch:
    key: BatchKey
    images: list[np.ndarray]  # each [H, W, 3] uint8
    boxes: list[np.ndarray]  # each [N, 4] xyxy float32, in the image's pixels (after the flip)
    labels: list[np.ndarray]  # each [N] int64, 1..K
    image_ids: tuple
    annotation_ids: tuple  # one tuple per image
    meta: dict[str, Any] = field(default_factory=dict)


class BatchLoadError(Exception):
    """A batch could not be decoded; carries its key (so the incident names the images) and the cause."""

    def __init__(self, key: BatchKey, image_ids: tuple, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.key, self.image_ids, self.cause = key, image_ids, cause


class BatchSampler:
    """Deterministic batches over `n` records; the cursor and quarantine are its whole state."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0
        self.quarantined: set[int] = set()  # record indices, effective from the next epoch
        self._excluded: dict[int, frozenset[int]] = {0: frozenset()}  # epoch -> excluded at its start
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            excluded = self._excluded.get(epoch, frozenset(self.quarantined))
            if excluded:
                perm = perm[~np.isin(perm, np.fromiter(excluded, dtype=np.int64))]
            self._orders = {epoch: perm}  # keep one epoch cached: this runs for millions of steps
        return self._orders[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        # drop_last, but an epoch smaller than one batch still yields one (short) batch
        return max(1, len(self.order(epoch)) // self.batch_size)

    def keys_at(self, epoch: int, position: int) -> BatchKey:
        order = self.order(epoch)
        chunk = order[position * self.batch_size:(position + 1) * self.batch_size]
        return BatchKey(epoch, position, tuple(int(i) for i in chunk))

    def next_key(self) -> BatchKey:
        if len(self.order(self.epoch)) == 0:
            raise RuntimeError("every sample is quarantined; nothing left to train on")
        key = self.keys_at(self.epoch, self.position)
        self._advance(1)
        return key

    def skip(self, batches: int) -> None:
        """Move the cursor past `batches` batches without loading them (the window after a rollback)."""
        self._advance(batches)

    def _advance(self, batches: int) -> None:
        for _ in range(batches):
            self.position += 1
            if self.position >= self.batches_in_epoch(self.epoch):
                self.epoch += 1
                self.position = 0
                self._excluded[self.epoch] = frozenset(self.quarantined)
                # the loader may step the cursor back one epoch (prefetched batches dropped): keep two
                self._excluded = {e: x for e, x in self._excluded.items() if e >= self.epoch - 1}

    def quarantine(self, indices: list[int] | set[int]) -> None:
        self.quarantined.update(int(i) for i in indices)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "quarantined": sorted(self.quarantined),
            "excluded_this_epoch": sorted(self._excluded.get(self.epoch, frozenset())),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.quarantined = {int(i) for i in state["quarantined"]}
        self._excluded = {self.epoch: frozenset(int(i) for i in state["excluded_this_epoch"])}
        self._orders = {}


# Modes that hold more than 8 bits per pixel: Pillow's convert("RGB") clips them at 255, which turns a
# 16-bit PNG (0..65535) all but white.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def load_image(path) -> np.ndarray:
    """[H, W, 3] uint8. Raises OSError/ValueError on a missing or undecodable file (a decompression
    bomb too). 16-bit images are scaled to 8 bits (65535 -> 255), not clipped."""
    try:
        with Image.open(path) as image:
            if image.mode in WIDE_MODES:
                return _wide_to_rgb8(image)
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as exc:  # not an OSError: callers would not catch it
        raise ValueError(str(exc)) from None


def _wide_to_rgb8(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image).astype(np.float64)
    peak = float(np.nanmax(pixels)) if pixels.size and not np.isnan(pixels).all() else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
        pixels = pixels / 257.0  # a 16-bit range (Pillow opens some 16-bit files as "I")
    elif image.mode == "F" and peak <= 1.0:
        pixels = pixels * 255.0  # float pixels in [0, 1]
    gray = np.clip(np.rint(np.nan_to_num(pixels)), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def load_batch(index: CocoIndex, key: BatchKey, *, seed: int, hflip: bool) -> Batch:
    """Decode and augment the images of one batch; deterministic in (seed, epoch, index)."""
    images, boxes, labels = [], [], []
    for i in key.indices:
        record = index.records[i]
        image = load_image(record.path)
        record_boxes = record.boxes.copy()
        if hflip and np.random.default_rng([seed, key.epoch, i]).random() < 0.5:
            image = image[:, ::-1]
            width = image.shape[1]
            record_boxes[:, [0, 2]] = width - record_boxes[:, [2, 0]]
        images.append(np.ascontiguousarray(image))
        boxes.append(record_boxes)
        labels.append(record.labels)
    records = [index.records[i] for i in key.indices]
    return Batch(key, images, boxes, labels,
                 tuple(r.image_id for r in records), tuple(r.annotation_ids for r in records))


class Loader:
    """Batches in sampler order, decoded `prefetch` batches ahead in a thread."""

    def __init__(self, index: CocoIndex, batch_size: int, *, seed: int, hflip: bool = True,
                 prefetch: int = 2) -> None:
        self.index, self.seed, self.hflip = index, seed, hflip
        self.sampler = BatchSampler(len(index), batch_size, seed)
        self.prefetch = max(0, prefetch)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nanguard-loader") \
            if self.prefetch else None
        self._queue: deque[tuple[BatchKey, concurrent.futures.Future[Batch]]] = deque()

    def _load(self, key: BatchKey) -> Batch:
        try:
            return load_batch(self.index, key, seed=self.seed, hflip=self.hflip)
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for missing or broken files
            raise BatchLoadError(key, tuple(self.index.records[i].image_id for i in key.indices), exc) from exc

    def next(self) -> Batch:
        """The next batch. Raises `BatchLoadError` for an undecodable one (the trainer records it as an
        incident and goes on with the next)."""
        if self._pool is None:
            return self._load(self.sampler.next_key())
        while len(self._queue) <= self.prefetch:
            key = self.sampler.next_key()
            self._queue.append((key, self._pool.submit(self._load, key)))
        _, future = self._queue.popleft()
        return future.result()

    def replay(self, key: BatchKey) -> Batch:
        return self._load(key)

    def _drop_prefetched(self) -> None:
        """Forget batches decoded ahead and put the cursor back where the consumer is."""
        if self._queue:
            first = self._queue[0][0]
            for _, future in self._queue:
                future.cancel()
            self._queue.clear()
            self.sampler.epoch, self.sampler.position = first.epoch, first.position
            self.sampler._excluded.setdefault(first.epoch, frozenset(self.sampler.quarantined))

    def skip(self, batches: int) -> None:
        self._drop_prefetched()
        self.sampler.skip(batches)

    def quarantine(self, image_ids) -> list[int]:
        """Exclude these images from the next epoch on; returns the record indices."""
        wanted = set(image_ids)
        found = [i for i, r in enumerate(self.index.records) if r.image_id in wanted]
        self.sampler.quarantine(found)
        return found

    def state_dict(self) -> dict[str, Any]:
        self._drop_prefetched()  # the state is where the consumer is, not where the prefetcher got to
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drop_prefetched()
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        if self._pool is not None:
            self._drop_prefetched()
            self._pool.shutdown(wait=True)
