"""A synthetic COCO detection dataset of coloured shapes, generated in seconds and byte-reproducible.

Layout: OUT/annotations/instances_{train,val}.json, OUT/train/000000000001.png, OUT/val/... .
Classes are shapes (`SHAPES`, the first K of them; category ids 1..K). Colour is drawn independently
of the class, so only the outline tells classes apart. Each image has 1-6 objects on a smooth gradient
with mild texture and a little clutter (thin lines, small dots) that is never annotated.

Determinism: every image has its own RNG, `np.random.default_rng([seed, split_index, image_index])`
(split_index 0 = train, 1 = val), so images can be made in any order, in any number of processes, and
still come out byte-identical. PNGs are encoded by PIL with fixed settings; the json has no timestamps.

Annotations: `bbox` [x, y, w, h] floats (pixel edges: pixel i spans [i, i+1)) is the tight box of the
shape's geometry, which is kept at least 1 px inside the image; `area` is the shape's polygon area
(the hole of a ring excluded); `segmentation` is the outer outline as one polygon.

The json files are written last, atomically: a run killed midway never looks complete, and a rerun with
the same parameters (same `info` block) on a complete dataset does nothing.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nanguard.config import MAX_IMAGE_SIDE
from nanguard.errors import UserError
from nanguard.fileio import atomic_write_bytes, atomic_write_json

SHAPES = ("rectangle", "ellipse", "triangle", "pentagon", "star", "cross", "ring", "diamond")
SPLITS = ("train", "val")  # position = split_index in the RNG seed
GENERATOR = "nanguard synth"
GENERATOR_VERSION = 1  # bump whenever the pixels or the json change, so cached datasets are remade

MIN_SIZE = 32
MAX_IMAGES = 1_000_000  # per split
MAX_OBJECTS = 6
SIDE_RANGE = (0.08, 0.45)  # object side, as a fraction of the image side
MAX_IOU = 0.3
MAX_COVERED = 0.5  # IoU misses a small box hidden under a big one: also cap intersection / smaller area
MIN_CONTRAST = 100.0  # RGB distance between an object colour and the mean background under its box
PNG_SETTINGS = {"format": "PNG", "compress_level": 6, "optimize": False}
_ROTATED = {"triangle": math.pi, "pentagon": math.pi, "star": math.pi,
            # a diamond turned 45 degrees is an axis-aligned square, i.e. a rectangle: keep it tilted
            "diamond": math.radians(20)}
_IMAGE_NAME = re.compile(r"^\d{12}\.png$")


@dataclass(frozen=True)
class PlacedShape:
    """One drawn object. outline, hole: [N, 2] xy float64 in pixel-edge coordinates."""

    category_id: int
    outline: np.ndarray
    hole: np.ndarray | None
    box: tuple[float, float, float, float]  # x0, y0, x1, y1

    def area(self) -> float:
        area = _polygon_area(self.outline)
        return area - _polygon_area(self.hole) if self.hole is not None else area


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _circle(count: int, radius: float = 1.0, start: float = 0.0) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(count) / count
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _unit_shape(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Outline (and hole) of a shape inside [-1, 1]^2, image y pointing down."""
    if name == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float), None
    if name == "ellipse":
        return _circle(64), None  # 64 points: the extremes lie exactly on the axes
    if name == "triangle":
        return _circle(3, start=-math.pi / 2), None
    if name == "pentagon":
        return _circle(5, start=-math.pi / 2), None
    if name == "star":
        points = _circle(10, start=-math.pi / 2)
        points[1::2] *= 0.45  # a fat inner radius keeps the points visible at 10 px
        return points, None
    if name == "cross":
        t = 0.34  # half the arm thickness
        return np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1],
                         [-t, t], [-1, t], [-1, -t], [-t, -t]], dtype=float), None
    if name == "ring":
        return _circle(64), _circle(64, radius=0.55)
    if name == "diamond":
        return np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=float), None
    raise ValueError(f"unknown shape {name!r}")


def _random_shape(rng: np.random.Generator, category_id: int, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A shape of random size, aspect and (where allowed) rotation, centred on the origin."""
    name = SHAPES[category_id - 1]
    outline, hole = _unit_shape(name)
    min_side, max_side = SIDE_RANGE[0] * size, SIDE_RANGE[1] * size
    side = rng.uniform(min_side, max_side)
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    scale = np.array([side * math.sqrt(aspect), side / math.sqrt(aspect)]) / 2
    turn = rng.uniform(-_ROTATED[name], _ROTATED[name]) if name in _ROTATED else 0.0
    rotation = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    outline = (outline * scale) @ rotation.T
    hole = (hole * scale) @ rotation.T if hole is not None else None
    # Rotation changes the extent: rescale so that both box sides stay within [min_side, max_side].
    extent = outline.max(axis=0) - outline.min(axis=0)
    factor = max(1.0, min_side / extent.min())
    factor = min(factor, max_side * 1.15 / extent.max())
    centre = (outline.max(axis=0) + outline.min(axis=0)) / 2
    outline = (outline - centre) * factor
    hole = (hole - centre) * factor if hole is not None else None
    return outline, hole


def _overlaps(box: tuple[float, ...], placed: list[PlacedShape]) -> bool:
    for other in placed:
        ix = min(box[2], other.box[2]) - max(box[0], other.box[0])
        iy = min(box[3], other.box[3]) - max(box[1], other.box[1])
        if ix <= 0 or iy <= 0:
            continue
        inter = ix * iy
        area_a = (box[2] - box[0]) * (box[3] - box[1])
        area_b = (other.box[2] - other.box[0]) * (other.box[3] - other.box[1])
        if inter / (area_a + area_b - inter) > MAX_IOU or inter / min(area_a, area_b) > MAX_COVERED:
            return True
    return False


def _place_shapes(rng: np.random.Generator, size: int, classes: int) -> list[PlacedShape]:
    placed: list[PlacedShape] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        category_id = int(rng.integers(1, classes + 1))
        for _attempt in range(20):
            outline, hole = _random_shape(rng, category_id, size)
            low, high = outline.min(axis=0), outline.max(axis=0)
            # 1 px margin: the box never touches the border, so x + w <= width holds after rounding
            shift = np.array([rng.uniform(1 - low[0], size - 1 - high[0]),
                              rng.uniform(1 - low[1], size - 1 - high[1])])
            box = (*(low + shift), *(high + shift))
            if not _overlaps(box, placed):
                placed.append(PlacedShape(category_id, outline + shift,
                                          hole + shift if hole is not None else None, box))
                break
    # Big shapes first: a small one drawn later stays visible on top of a big one.
    placed.sort(key=lambda shape: -(shape.box[2] - shape.box[0]) * (shape.box[3] - shape.box[1]))
    return placed


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random two-colour gradient with a soft ripple: [S, S, 3] float32."""
    start = rng.uniform(0, 255, 3)
    end = np.clip(start + rng.uniform(-90, 90, 3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    x, y = coords[None, :], coords[:, None]
    along = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)
    t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    image = start + (end - start) * t[..., None]
    frequency = rng.uniform(2, 6, 2) * rng.choice([-1, 1], 2) * 2 * math.pi
    ripple = np.sin(frequency[0] * x + frequency[1] * y + rng.uniform(0, 2 * math.pi))
    return (image + rng.uniform(4, 12) * ripple[..., None]).astype(np.float32)


def _draw_clutter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Thin lines and small dots, drawn before the objects; never annotated."""
    size = image.shape[0]
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 5))):
        start = rng.uniform(0, size, 2)
        length, angle = rng.uniform(0.1, 0.4) * size, rng.uniform(0, 2 * math.pi)
        end = start + length * np.array([math.cos(angle), math.sin(angle)])
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line([tuple(start), tuple(end)], fill=colour, width=1)
    radius = max(1.0, size / 96)
    for _ in range(int(rng.integers(0, 6))):
        cx, cy = rng.uniform(0, size, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    return np.asarray(canvas, dtype=np.float32)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray,
                        avoid: np.ndarray | None = None) -> np.ndarray:
    """A random colour at least MIN_CONTRAST from `background` (and 60 from `avoid`), else the best of
    the tries: colour is uniform over the cube, never tied to the class."""
    best, best_distance = None, -1.0
    for _ in range(30):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        distance = float(np.linalg.norm(colour - background))
        if avoid is not None and np.linalg.norm(colour - avoid) < 60:
            distance = min(distance, 0.0)
        if distance >= MIN_CONTRAST:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _inside(polygon: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd test of pixel centres (xs [W], ys [H]) against a polygon [N, 2]: [H, W] bool.
    Our own scanline test, not PIL's: PIL truncates vertices to whole pixels, which would leave the
    drawn shape up to a pixel off the annotated box."""
    xa, ya = polygon[:, 0], polygon[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    crosses = (ya[None, :] > ys[:, None]) != (yb[None, :] > ys[:, None])  # [H, E]
    dy = np.where(yb == ya, 1.0, yb - ya)  # horizontal edges never cross; avoid dividing by 0
    x_cross = xa + (ys[:, None] - ya) * (xb - xa) / dy  # [H, E]
    left_of = xs[None, :, None] < x_cross[:, None, :]  # [H, W, E]
    return (np.count_nonzero(left_of & crosses[:, None, :], axis=2) % 2) == 1


def _draw_shape(rng: np.random.Generator, image: np.ndarray, shape: PlacedShape) -> None:
    size = image.shape[0]
    x0, y0 = int(shape.box[0]), int(shape.box[1])
    x1, y1 = math.ceil(shape.box[2]), math.ceil(shape.box[3])
    xs, ys = np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5
    window = _inside(shape.outline, xs, ys)
    if shape.hole is not None:
        window &= ~_inside(shape.hole, xs, ys)
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y0:y1, x0:x1] = window
    local = image[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
    colour = _contrasting_colour(rng, local)
    if rng.random() < 0.3:  # stripes instead of a flat fill
        second = _contrasting_colour(rng, local, avoid=colour)
        period = max(2, round(rng.uniform(4, 8) * size / 128))
        direction = rng.integers(0, 4)  # horizontal, vertical, two diagonals
        ys, xs = np.nonzero(mask)
        coordinate = [ys, xs, xs + ys, xs - ys][direction]
        on_second = (coordinate // period) % 2 == 1
        image[ys, xs] = np.where(on_second[:, None], second, colour)
    else:
        image[mask] = colour


def render(seed: int, split_index: int, index: int, size: int, classes: int) -> tuple[np.ndarray, list[PlacedShape]]:
    """One image ([S, S, 3] uint8) and its shapes; a pure function of its arguments."""
    rng = np.random.default_rng([seed, split_index, index])
    shapes = _place_shapes(rng, size, classes)
    image = _draw_clutter(rng, _background(rng, size))
    for shape in shapes:
        _draw_shape(rng, image, shape)
    image += rng.normal(0.0, 3.0, image.shape).astype(np.float32)  # mild sensor noise over everything
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), shapes


def _make_image(task: tuple[str, int, int, int, int, int]) -> list[dict[str, Any]]:
    """Render one image, write its PNG, return its annotations (no ids yet). Runs in a worker."""
    folder, seed, split_index, index, size, classes = task
    pixels, shapes = render(seed, split_index, index, size, classes)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, **PNG_SETTINGS)
    atomic_write_bytes(Path(folder) / image_name(index), buffer.getvalue())
    annotations = []
    for shape in shapes:
        x0, y0, x1, y1 = (round(float(v), 2) for v in shape.box)
        annotations.append({
            "category_id": shape.category_id,
            "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": round(shape.area(), 2),
            "iscrowd": 0,
            "segmentation": [[round(float(v), 2) for v in shape.outline.reshape(-1)]],
        })
    return annotations


def image_name(index: int) -> str:
    return f"{index:012d}.png"



def check_params(*, images: int, val_images: int, size: int, classes: int, seed: int) -> None:
    """Raise UserError, naming the flag and the fix, for a value that cannot make a dataset."""
    if images < 1:
        raise UserError(f"--images must be at least 1 (got {images}); pass --images 2000 or any count >= 1")
    if val_images < 0:
        raise UserError(f"--val-images must be 0 or more (got {val_images}); pass --val-images 200")
    if images > MAX_IMAGES or val_images > MAX_IMAGES:
        raise UserError(f"--images and --val-images must be at most {MAX_IMAGES:,} (got {max(images, val_images):,}); "
                        "a generated set that large is a typo: pass --images 2000")
    if not MIN_SIZE <= size <= MAX_IMAGE_SIDE:
        raise UserError(f"--size must be between {MIN_SIZE} and {MAX_IMAGE_SIDE} px (got {size}); pass --size 128")
    if not 1 <= classes <= len(SHAPES):
        raise UserError(f"--classes must be between 1 and {len(SHAPES)} (got {classes}); "
                        f"pass --classes 3 (shapes in order: {', '.join(SHAPES)})")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more (got {seed}); pass --seed 0")


def dataset_info(*, images: int, val_images: int, size: int, classes: int, seed: int) -> dict[str, Any]:
    """The COCO `info` block: everything that decides the bytes, so equal info means an equal dataset."""
    return {"description": "nanguard synthetic shapes", "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION, "images": images, "val_images": val_images,
            "size": size, "classes": classes, "seed": seed}


def _annotation_path(out: Path, split: str) -> Path:
    return out / "annotations" / f"instances_{split}.json"


def _read_info(out: Path, split: str) -> dict[str, Any] | None:
    try:
        info = json.loads(_annotation_path(out, split).read_text(encoding="utf-8")).get("info")
    except (OSError, ValueError, AttributeError):
        return None
    return info if isinstance(info, dict) else None


def _split_counts(info: dict[str, Any]) -> dict[str, int]:
    return {"train": info["images"], "val": info["val_images"]}


def is_complete(out: str | os.PathLike[str], info: dict[str, Any]) -> bool:
    """True when OUT holds the finished dataset `info` describes: both json files (written last) carry
    this info, and every image file is there."""
    out = Path(out)
    if any(_read_info(out, split) != info for split in SPLITS):
        return False
    counts = _split_counts(info)
    return all((out / split / image_name(index)).is_file()
               for split in SPLITS for index in range(1, counts[split] + 1))


def _check_folder(out: Path) -> None:
    """OUT may be missing, empty, or a synth dataset (finished or interrupted); nothing else is
    overwritten."""
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file; pass a folder path for the dataset")
    if not out.is_dir():
        return
    entries = {entry.name for entry in out.iterdir()}
    ours = entries <= {"annotations", *SPLITS}
    infos = [_read_info(out, split) for split in SPLITS if _annotation_path(out, split).exists()]
    if not ours or any(info is None or info.get("generator") != GENERATOR for info in infos):
        raise UserError(f"OUT {out} is a non-empty folder that is not a synth dataset; "
                        f"pass a new or empty folder (nothing in {out} was changed)")


def _clear_stale(out: Path, counts: dict[str, int]) -> None:
    """Before regenerating: drop the json first (the dataset must stop looking complete), then images
    beyond the new counts, so the folder ends up exactly what these parameters make."""
    for split in SPLITS:
        _annotation_path(out, split).unlink(missing_ok=True)
    for split in SPLITS:
        folder = out / split
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _IMAGE_NAME.match(entry.name) and int(entry.name[:12]) > counts[split]:
                entry.unlink()


def _coco(info: dict[str, Any], per_image: list[list[dict[str, Any]]], size: int,
          classes: int) -> dict[str, Any]:
    images, annotations = [], []
    for index, objects in enumerate(per_image, start=1):
        images.append({"id": index, "file_name": image_name(index), "width": size, "height": size})
        for annotation in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index, **annotation})
    categories = [{"id": i, "name": SHAPES[i - 1], "supercategory": "shape"} for i in range(1, classes + 1)]
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def generate(out: str | os.PathLike[str], *, images: int = 2000, val_images: int = 200, size: int = 128,
             classes: int = 3, seed: int = 0, progress: bool = True,
             workers: int | None = None) -> dict[str, Any]:
    """Write the dataset to `out` (or find it already complete) and return a summary:
    {out, train_images, val_images, train_objects, val_objects, size, classes, seed, skipped, seconds}.

    workers: processes to render with; None picks the CPU count for big runs and 1 for small ones. The
    output bytes do not depend on it.
    """
    check_params(images=images, val_images=val_images, size=size, classes=classes, seed=seed)
    out = Path(out)
    info = dataset_info(images=images, val_images=val_images, size=size, classes=classes, seed=seed)
    started = time.perf_counter()
    _check_folder(out)
    summary = {"out": str(out), "train_images": images, "val_images": val_images, "size": size,
               "classes": classes, "seed": seed}
    if is_complete(out, info):
        objects = {split: len(json.loads(_annotation_path(out, split).read_text(encoding="utf-8"))
                              ["annotations"]) for split in SPLITS}
        return {**summary, "train_objects": objects["train"], "val_objects": objects["val"],
                "skipped": True, "seconds": round(time.perf_counter() - started, 3)}

    counts = _split_counts(info)
    _clear_stale(out, counts)
    tasks = []
    for split_index, split in enumerate(SPLITS):
        (out / split).mkdir(parents=True, exist_ok=True)
        tasks += [(str(out / split), seed, split_index, index, size, classes)
                  for index in range(1, counts[split] + 1)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(tasks) >= 200 else 1
    results = _run_tasks(tasks, workers, progress)

    coco = {split: _coco(info, results[:images] if split == "train" else results[images:], size, classes)
            for split in SPLITS}
    for split in SPLITS:  # last, and atomically: only now does the dataset look complete
        atomic_write_json(_annotation_path(out, split), coco[split], indent=None)
    return {**summary, "train_objects": len(coco["train"]["annotations"]),
            "val_objects": len(coco["val"]["annotations"]), "skipped": False,
            "seconds": round(time.perf_counter() - started, 3)}


def _run_tasks(tasks: list[tuple], workers: int, progress: bool) -> list[list[dict[str, Any]]]:
    import contextlib
    import multiprocessing

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    results: list[list[dict[str, Any]]] = []
    # The pool is started before rich's refresh thread: forking a process that runs threads is unsafe.
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(multiprocessing.Pool(workers)) if workers > 1 else None
        mapped = pool.imap(_make_image, tasks, chunksize=16) if pool else map(_make_image, tasks)
        if not progress:
            return list(mapped)
        bar = stack.enter_context(Progress(
            TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True))
        job = bar.add_task("images", total=len(tasks))
        for annotations in mapped:
            results.append(annotations)
            bar.advance(job)
    return results
