"""A deterministic, replayable batch loader (framework-free: both backends use it).

The order of epoch `e` is a permutation drawn from `rng([seed, e])`; augmentation of image `i` in epoch
`e` from `rng([seed, e, i])`. So a batch is a pure function of (seed, epoch, position, the quarantines
made before the epoch began), which is what makes three things possible:
- exact resume: the cursor and the quarantine history go into the checkpoint, and a resumed run sees
  exactly the batches it would have seen;
- replay: `BatchSampler.keys_at(epoch, position)` rebuilds any past batch for diagnosis (the sampler
  keeps the history of quarantines, so later ones do not change earlier epochs);
- skipping a window after a rollback: `skip(n)` moves the cursor on without loading anything.
Quarantined samples leave the order from the next epoch on (never mid-epoch, so positions stay stable).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from nanguard.data.coco import CocoIndex


@dataclass(frozen=True)
class BatchKey:
    epoch: int
    position: int  # batch number within the epoch
    indices: tuple[int, ...]  # record indices in CocoIndex

    def to_dict(self) -> dict[str, int]:
        """Where the batch sits, as plain data for an incident line (its image ids travel with the batch)."""
        return {"epoch": self.epoch, "position": self.position}


@dataclass
class Batch:
    key: BatchKey
    images: list[np.ndarray]  # each [H, W, 3] uint8 (float32 with NaN in `BatchLoadError.placeholder`)
    boxes: list[np.ndarray]  # each [N, 4] xyxy float32, in the image's pixels (after the flip)
    labels: list[np.ndarray]  # each [N] int64, 1..K
    image_ids: tuple
    annotation_ids: tuple  # one tuple per image
    # distributed: the image / annotation ids of every rank's share of the global batch, rank by rank
    # (every rank knows them without communication: the sampler is deterministic); one share otherwise
    rank_image_ids: tuple = ()
    rank_annotation_ids: tuple = ()


class BatchLoadError(Exception):
    """A batch could not be decoded; carries its key (so the incident names the images) and the cause."""

    def __init__(self, key: BatchKey, image_ids: tuple, cause: BaseException, annotation_ids: tuple = (),
                 rank_image_ids: tuple = (), rank_annotation_ids: tuple = ()) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.key, self.image_ids, self.cause, self.annotation_ids = key, image_ids, cause, annotation_ids
        # distributed: every rank's share, as the batch would have carried them
        self.rank_image_ids, self.rank_annotation_ids = rank_image_ids, rank_annotation_ids

    def placeholder(self) -> Batch:
        """A batch that stands in for this one on a rank of a distributed run, whose peers are already in
        the step's collectives: its images (one per image of the share) carry a band of NaN pixels,
        as `nan_input` does, so the loss is non-finite on this rank alone and the ranks' agreed flags
        skip the step on every rank. Its ids are the unreadable share's."""
        n = len(self.image_ids)
        image = np.zeros((64, 64, 3), np.float32)
        image[:16] = np.nan
        return Batch(self.key, [image.copy() for _ in range(n)], [np.array([[8, 8, 40, 40]], np.float32)] * n,
                     [np.ones(1, np.int64)] * n, self.image_ids, self.annotation_ids, self.rank_image_ids,
                     self.rank_annotation_ids)


class BatchSampler:
    """Deterministic batches over `n` records; the cursor and the quarantine history are its whole state.

    The history is a list of (effective_epoch, record indices): a quarantine takes effect from the epoch
    after the one the cursor is in, and the samples excluded from epoch `e` are those of every entry
    with effective_epoch <= e. So the order of any past epoch can be rebuilt exactly, however much has
    been quarantined since.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0
        self._history: list[tuple[int, frozenset[int]]] = []  # (effective_epoch, indices), in call order
        self._orders: dict[int, np.ndarray] = {}

    @property
    def quarantined(self) -> set[int]:
        """Every quarantined record index, effective now or from a later epoch."""
        return {i for _, indices in self._history for i in indices}

    def excluded(self, epoch: int) -> frozenset[int]:
        """The record indices left out of `epoch`'s order."""
        return frozenset(i for effective, indices in self._history if effective <= epoch for i in indices)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            excluded = self.excluded(epoch)
            if excluded:
                perm = perm[~np.isin(perm, np.fromiter(excluded, dtype=np.int64))]
            self._orders = {epoch: perm}  # keep one epoch cached: this runs for millions of steps
        return self._orders[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        # drop_last, but an epoch smaller than one batch still yields one (short) batch
        return max(1, len(self.order(epoch)) // self.batch_size)

    def keys_at(self, epoch: int, position: int) -> BatchKey:
        """The key of batch `position` of `epoch`: for a past batch, exactly the key `next_key` gave."""
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

    def rewind(self, epoch: int, position: int) -> None:
        """Put the cursor back to a key it handed out (the loader drops batches it prefetched). Orders
        stay as they were: a quarantine made meanwhile still starts after the epoch the cursor had
        reached, so batches handed out again come out the same."""
        self.epoch, self.position = epoch, position

    def _advance(self, batches: int) -> None:
        for _ in range(batches):
            self.position += 1
            if self.position >= self.batches_in_epoch(self.epoch):
                self.epoch += 1
                self.position = 0

    def quarantine(self, indices: list[int] | set[int], effective: int | None = None) -> None:
        """Exclude these record indices from epoch `effective` on (default: the one after the cursor's)."""
        effective = self.epoch + 1 if effective is None else effective
        new = frozenset(int(i) for i in indices) - self.excluded(effective)
        if not new:
            return
        if self._history and self._history[-1][0] == effective:
            new |= self._history.pop()[1]
        self._history.append((effective, new))
        self._orders = {}  # a cached order of a later epoch may be one this changes

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "quarantine_history": [[effective, sorted(indices)] for effective, indices in self._history],
            # the format before the history, still written so that older readers resume the same
            "quarantined": sorted(self.quarantined),
            "excluded_this_epoch": sorted(self.excluded(self.epoch)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if "quarantine_history" in state:
            self._history = [(int(effective), frozenset(int(i) for i in indices))
                             for effective, indices in state["quarantine_history"]]
        else:  # an older checkpoint: what this epoch excluded, and the rest from the next; no history
            current = frozenset(int(i) for i in state["excluded_this_epoch"])
            later = frozenset(int(i) for i in state["quarantined"]) - current
            self._history = [(e, x) for e, x in ((self.epoch, current), (self.epoch + 1, later)) if x]
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


class ImageCache:
    """Decoded images kept in memory up to `max_bytes`, filled lazily (the first epoch decodes as before).

    The arrays are read-only: a batch hands out views of them, and an in-place write (a fault injected
    into a numpy image, say) must fail loudly rather than change every later epoch. A file that cannot be
    decoded is never cached, so it raises again each time it is drawn. Thread-safe: the prefetch thread
    fills it while `Loader.replay` may read it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self._images: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, index: int, path) -> np.ndarray:
        """The decoded image of record `index` (from memory, or decoded from `path` now)."""
        image = self._images.get(index)
        if image is not None:
            return image
        image = load_image(path)
        if self.bytes + image.nbytes <= self.max_bytes:
            image.flags.writeable = False
            with self._lock:
                if index not in self._images:
                    self._images[index] = image
                    self.bytes += image.nbytes
        return image

    def __len__(self) -> int:
        return len(self._images)

    def __contains__(self, index: int) -> bool:
        return index in self._images


def load_batch(index: CocoIndex, key: BatchKey, *, seed: int, hflip: bool, cache: ImageCache | None = None) -> Batch:
    """Decode (or take from `cache`) and augment the images of one batch; deterministic in
    (seed, epoch, index) whether an image came from the cache or the file."""
    images, boxes, labels = [], [], []
    for i in key.indices:
        record = index.records[i]
        image = cache.get(i, record.path) if cache is not None else load_image(record.path)
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


# 1 GiB: the generated demo set (2,000 images of 128 px) is ~100 MB; COCO's 118k train images
# (~0.9 MB each decoded) would keep only their first ~1,100 and decode the rest every time, as before
DEFAULT_CACHE_BYTES = 1 << 30


class Loader:
    """Batches in sampler order, decoded `prefetch` batches ahead in a thread; decoded images are kept
    in memory up to `cache_bytes` (0: decode every time)."""

    def __init__(self, index: CocoIndex, batch_size: int, *, seed: int, hflip: bool = True,
                 prefetch: int = 2, cache_bytes: int = DEFAULT_CACHE_BYTES, rank: int = 0, world: int = 1) -> None:
        """With `world` > 1, batches are global (batch_size x world images, one order for all ranks) and
        this rank loads its share, images [rank * batch_size, (rank + 1) * batch_size) of each."""
        self.index, self.seed, self.hflip = index, seed, hflip
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.cache = ImageCache(cache_bytes) if cache_bytes > 0 else None
        self.sampler = BatchSampler(len(index), batch_size * world, seed)
        self.consumed_epoch = 0  # the epoch of the last batch handed out
        self.prefetch = max(0, prefetch)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nanguard-loader") \
            if self.prefetch else None
        self._queue: deque[tuple[BatchKey, concurrent.futures.Future[Batch]]] = deque()

    def _load(self, key: BatchKey) -> Batch:
        shares = [key.indices[r * self.batch_size:(r + 1) * self.batch_size] for r in range(self.world)]
        records = self.index.records
        rank_ids = tuple(tuple(records[i].image_id for i in share) for share in shares)
        rank_anns = tuple(tuple(records[i].annotation_ids for i in share) for share in shares)
        key = BatchKey(key.epoch, key.position, shares[self.rank]) if self.world > 1 else key
        try:
            batch = load_batch(self.index, key, seed=self.seed, hflip=self.hflip, cache=self.cache)
            return replace(batch, rank_image_ids=rank_ids, rank_annotation_ids=rank_anns)
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for missing or broken files
            records = [self.index.records[i] for i in key.indices]
            raise BatchLoadError(key, tuple(r.image_id for r in records), exc,
                                 tuple(r.annotation_ids for r in records), rank_ids, rank_anns) from exc

    def next(self) -> Batch:
        """The next batch. Raises `BatchLoadError` for an undecodable one (the trainer records it as an
        incident and goes on with the next)."""
        if self._pool is None:
            key = self.sampler.next_key()
            self.consumed_epoch = key.epoch
            return self._load(key)
        while len(self._queue) <= self.prefetch:
            key = self.sampler.next_key()
            self._queue.append((key, self._pool.submit(self._load, key)))
        key, future = self._queue.popleft()
        self.consumed_epoch = key.epoch
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
            self.sampler.rewind(first.epoch, first.position)

    def skip(self, batches: int) -> None:
        self._drop_prefetched()
        self.sampler.skip(batches)

    def quarantine(self, image_ids) -> list[int]:
        """Exclude these images from the epoch after the one the last batch handed out belongs to;
        returns the record indices. The consumer's epoch, not the prefetcher's: which batches a run sees
        must not depend on data.prefetch (batches prefetched into that epoch are drawn again)."""
        wanted = set(image_ids)
        found = [i for i, r in enumerate(self.index.records) if r.image_id in wanted]
        effective = self.consumed_epoch + 1
        self.sampler.quarantine(found, effective)
        if any(key.epoch >= effective for key, _ in self._queue):
            self._drop_prefetched()
        return found

    def state_dict(self) -> dict[str, Any]:
        self._drop_prefetched()  # the state is where the consumer is, not where the prefetcher got to
        return {**self.sampler.state_dict(), "consumed_epoch": self.consumed_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drop_prefetched()
        self.sampler.load_state_dict(state)
        self.consumed_epoch = int(state.get("consumed_epoch", self.sampler.epoch))

    def close(self) -> None:
        if self._pool is not None:
            self._drop_prefetched()
            self._pool.shutdown(wait=True)
