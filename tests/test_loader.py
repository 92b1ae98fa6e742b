"""The COCO index and the deterministic, replayable loader (framework-free)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanguard.data.coco import build_index, read_coco_json
from nanguard.data.loader import BatchKey, BatchLoadError, BatchSampler, Loader
from nanguard.errors import UserError


def _index(shapes: Path):
    ann = shapes / "annotations/instances_train.json"
    return build_index(read_coco_json(ann), ann, shapes / "train")


def test_order_is_a_function_of_seed_and_epoch():
    a, b = BatchSampler(10, 3, seed=4), BatchSampler(10, 3, seed=4)
    keys_a = [a.next_key() for _ in range(7)]
    keys_b = [b.next_key() for _ in range(7)]
    assert keys_a == keys_b
    assert keys_a[0].epoch == 0 and keys_a[3].epoch == 1  # 10 // 3 = 3 batches an epoch (drop_last)
    assert a.keys_at(1, 0) == keys_a[3]  # replay any past batch
    assert BatchSampler(10, 3, seed=5).next_key() != keys_a[0]


def test_state_round_trip_and_skip():
    a = BatchSampler(11, 2, seed=0)
    for _ in range(4):
        a.next_key()
    b = BatchSampler(11, 2, seed=0)
    b.load_state_dict(a.state_dict())
    assert [a.next_key() for _ in range(9)] == [b.next_key() for _ in range(9)]
    c, d = BatchSampler(11, 2, seed=0), BatchSampler(11, 2, seed=0)
    c.skip(3)
    for _ in range(3):
        d.next_key()
    assert c.next_key() == d.next_key()


def test_quarantine_applies_from_the_next_epoch():
    s = BatchSampler(8, 2, seed=0)
    first = s.next_key()
    s.quarantine([first.indices[0]])
    rest_of_epoch = [s.next_key() for _ in range(3)]
    assert all(k.epoch == 0 for k in rest_of_epoch)
    next_epoch = [i for _ in range(3) for i in s.next_key().indices]
    assert first.indices[0] not in next_epoch
    assert s.state_dict()["quarantined"] == [first.indices[0]]


def test_every_past_key_replays_exactly_after_quarantines():
    """keys_at(e, p) gives the key next_key() handed out, for every epoch, however much was quarantined
    after it (the replay of past steps depends on it); also after a state_dict round trip."""
    s = BatchSampler(20, 3, seed=7)
    handed_out = []
    for step in range(60):  # 6 batches an epoch at first: 10 epochs, quarantines in 5 of them
        key = s.next_key()
        handed_out.append(key)
        if step in (2, 9, 10, 25, 40, 41):
            s.quarantine([key.indices[0]])
    assert len(s.quarantined) == 6 and handed_out[-1].epoch >= 9
    for key in handed_out:
        assert s.keys_at(key.epoch, key.position) == key
    restored = BatchSampler(20, 3, seed=7)
    restored.load_state_dict(s.state_dict())
    for key in handed_out:
        assert restored.keys_at(key.epoch, key.position) == key
    assert [s.next_key() for _ in range(12)] == [restored.next_key() for _ in range(12)]


def test_state_saved_before_the_history_resumes_the_same():
    """A checkpoint from before the quarantine history (`quarantined` + `excluded_this_epoch` only)
    continues with the same batches."""
    s = BatchSampler(12, 2, seed=1)
    for _ in range(8):
        s.next_key()
    s.quarantine([3])
    s.next_key()
    s.quarantine([5])
    state = s.state_dict()
    old_format = {k: state[k] for k in ("epoch", "position", "quarantined", "excluded_this_epoch")}
    restored = BatchSampler(12, 2, seed=1)
    restored.load_state_dict(old_format)
    assert [s.next_key() for _ in range(20)] == [restored.next_key() for _ in range(20)]


def test_loader_keys_replay_with_prefetch_checkpoints_and_quarantine(shapes):
    """The loader's cursor runs ahead (prefetch) and steps back (state_dict, skip); the batches it
    handed out still come back from keys_at, and a replay loads the same pixels."""
    index = _index(shapes)  # 24 images, batch 5: 4 batches an epoch
    loader = Loader(index, 5, seed=2, prefetch=2)
    batches = []
    for step in range(30):
        batches.append(loader.next())
        if step in (3, 6, 14):
            loader.quarantine([batches[-1].image_ids[0]])
        if step % 4 == 1:
            loader.state_dict()  # a checkpoint: drops what was prefetched
        if step == 20:
            loader.skip(2)
    for batch in batches:
        key = batch.key
        assert loader.sampler.keys_at(key.epoch, key.position) == key
    again = loader.replay(batches[5].key)
    assert all(np.array_equal(a, b) for a, b in zip(again.images, batches[5].images))
    loader.close()


def test_batch_key_as_plain_data():
    assert BatchKey(3, 7, (1, 2)).to_dict() == {"epoch": 3, "position": 7}


def test_cached_images_give_the_same_batches(shapes):
    index = _index(shapes)
    cached = Loader(index, 4, seed=3, prefetch=1)
    uncached = Loader(index, 4, seed=3, prefetch=0, cache_bytes=0)
    for _ in range(15):  # 6 batches an epoch: later epochs come from memory
        a, b = cached.next(), uncached.next()
        assert a.key == b.key
        for x, y in zip(a.images, b.images):
            assert np.array_equal(x, y)
    assert len(cached.cache) == len(index) and uncached.cache is None
    first = cached.cache.get(0, index.records[0].path)
    with pytest.raises(ValueError):  # batches hand out views of the cache: it must not be written
        first[0, 0, 0] = 1
    cached.close()
    small = Loader(index, 4, seed=3, prefetch=0, cache_bytes=3 * first.nbytes)
    for _ in range(6):
        small.next()
    assert len(small.cache) == 3 and small.cache.bytes <= 3 * first.nbytes


def test_an_unreadable_image_fails_every_time_with_the_cache(tmp_path, shapes):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(shapes, root)
    index = _index(root)
    broken = index.records[0]
    Path(broken.path).write_bytes(b"not a png")
    loader = Loader(index, 24, seed=0, prefetch=0)  # one batch an epoch: every batch holds the image
    for _ in range(2):
        with pytest.raises(BatchLoadError) as err:
            loader.next()
        assert broken.image_id in err.value.image_ids
    assert 0 not in loader.cache


def test_batches_carry_ids_and_are_deterministic(shapes):
    index = _index(shapes)
    one = Loader(index, 4, seed=3, prefetch=2)
    two = Loader(index, 4, seed=3, prefetch=0)
    for _ in range(8):
        a, b = one.next(), two.next()
        assert a.key == b.key and a.image_ids == b.image_ids and a.annotation_ids == b.annotation_ids
        for x, y in zip(a.images, b.images):
            assert np.array_equal(x, y)
        for boxes, image, anns in zip(a.boxes, a.images, a.annotation_ids):
            assert len(boxes) == len(anns)
            assert (boxes[:, 2] <= image.shape[1] + 1e-3).all() and (boxes[:, 0] >= -1e-3).all()
    state = one.state_dict()  # prefetched batches are not part of the state
    three = Loader(index, 4, seed=3, prefetch=0)
    three.load_state_dict(state)
    assert one.next().key == three.next().key
    one.close()


def test_crowd_boxes_excluded_and_empty_images_kept(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "img/a.png")
    Image.new("RGB", (32, 32), (30, 20, 10)).save(tmp_path / "img/b.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                      {"id": 2, "file_name": "b.png", "width": 32, "height": 32}],
           "annotations": [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
                           {"id": 11, "image_id": 1, "category_id": 7, "bbox": [0, 0, 30, 30], "iscrowd": 1}],
           "categories": [{"id": 7, "name": "x"}, {"id": 3, "name": "y"}]}
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(doc))
    index = build_index(read_coco_json(ann), ann, tmp_path / "img")
    assert index.category_ids == (3, 7)  # sorted ids -> contiguous labels 1..K
    first, second = index.records
    assert first.annotation_ids == (10,) and first.labels.tolist() == [2]
    assert first.boxes.tolist() == [[1.0, 2.0, 11.0, 7.0]]  # xywh -> xyxy
    assert second.boxes.shape == (0, 4)


@pytest.mark.parametrize("content, message", [
    ("{\"images\": [", "not valid JSON"),
    ("[1, 2]", "not a COCO detection file"),
    ("{\"images\": [], \"annotations\": []}", "no 'categories'"),
])
def test_bad_annotation_files(tmp_path, content, message):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_coco_json(path)
    with pytest.raises(UserError, match="missing.json: no such file"):
        read_coco_json(tmp_path / "missing.json")
