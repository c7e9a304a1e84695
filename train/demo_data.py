"""The demo's multimodal data set, generated deterministically: scenes of coloured shapes.

Each scene (a 96 × 96 RGB image drawn with PIL) holds 1-3 objects, each a colour, a shape
and a size. Three captions per image come from the scene description, so every noun phrase
("a large red circle") is known with its character span and its object: the object-phrase
pairs are exact. Features are computed from the pixels only, with numpy:

- image and region features (FEATURE_DIM floats): colour histogram (4 levels per channel),
  per-cell 8-colour occupancy on a 4 × 4 grid (layout and shape), and a fixed random
  projection of the 16 × 16 down-sampled pixels; regions are the objects' boxes.
- teacher features (TEACHER_DIM, a stand-in for CLIP): image side, the colour and shape read
  back from each region's pixels (mean colour, fill ratio of its box); text side, the colours
  and shapes named in the caption; both as attribute counts through one fixed random matrix,
  so that image and caption teachers share a space as CLIP's do.

`write_demo_data(directory)` writes the files of the pair format (docs/training.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

SIZE = 96  # image side, pixels
FEATURE_DIM = 64 + 16 * 8 + 64  # histogram + grid occupancy + projection
TEACHER_DIM = 64
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / box area
BACKGROUND = (235, 235, 230)
CAPTIONS_PER_IMAGE = 3


def _scene(rng: np.random.Generator) -> List[Dict]:
    """1-3 objects in distinct cells of a 3 × 3 grid: colour, shape, size, box (x0, y0, x1, y1)."""
    cells = rng.choice(9, size=int(rng.integers(1, 4)), replace=False)
    objects = []
    for cell in cells:
        large = bool(rng.integers(2))
        side = int(rng.integers(24, 30) if large else rng.integers(12, 18))
        cx, cy = (cell % 3) * 32 + 16, (cell // 3) * 32 + 16
        x0 = int(np.clip(cx - side // 2 + rng.integers(-3, 4), 0, SIZE - side))
        y0 = int(np.clip(cy - side // 2 + rng.integers(-3, 4), 0, SIZE - side))
        objects.append(
            {
                "colour": str(rng.choice(list(COLOURS))),
                "shape": str(rng.choice(SHAPES)),
                "size": "large" if large else "small",
                "box": (x0, y0, x0 + side, y0 + side),
            }
        )
    return objects


def _render(objects: List[Dict], rng: np.random.Generator) -> np.ndarray:
    """The scene as (SIZE, SIZE, 3) uint8 pixels, with a little background noise."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        colour = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1) / 2, y0)], fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, size=(SIZE, SIZE, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _where(o: Dict) -> Tuple[float, float]:
    x0, y0, x1, y1 = o["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _captions(objects: List[Dict], rng: np.random.Generator) -> List[Tuple[str, List[Tuple[int, int, int]]]]:
    """CAPTIONS_PER_IMAGE captions, each with its phrases as (start, end, object index)."""

    def build(parts) -> Tuple[str, List[Tuple[int, int, int]]]:
        text, spans = "", []
        for part in parts:
            if isinstance(part, int):
                o = objects[part]
                words = f"{o['size']} {o['colour']} {o['shape']}" if rng.integers(2) else f"{o['colour']} {o['shape']}"
                phrase = ("an " if words[0] in "aeiou" else "a ") + words
                spans.append((len(text), len(text) + len(phrase), part))
                text += phrase
            else:
                text += part
        return text + " .", spans

    order = [int(i) for i in rng.permutation(len(objects))]
    listing = [order[0]]
    for i in order[1:]:
        listing += [" and ", i]
    out = [build(["there is "] + listing if rng.integers(2) else listing + [" on a grey background"])]
    if len(objects) == 1:
        x, y = _where(objects[0])
        side = "left" if x < 40 else "right" if x > 56 else "middle"
        out.append(build([0, f" on the {side} of the picture"]))
        out.append(build(["a picture with ", 0, " in it"]))
    else:
        a, b = order[0], order[1]
        (xa, ya), (xb, yb) = _where(objects[a]), _where(objects[b])
        horizontal = "to the left of" if xa < xb else "to the right of"
        vertical = "above" if ya < yb else "below"
        out.append(build([a, f" is {horizontal} ", b]))
        out.append(build([a, f" {vertical} ", b] if abs(ya - yb) > 8 else [b, " next to ", a]))
    return out


def pixel_features(pixels: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """(FEATURE_DIM,) float32 features of an (h, w, 3) uint8 crop (the whole image or a region)."""
    foreground = np.abs(pixels.astype(np.int16) - BACKGROUND).sum(-1) > 60
    levels = (pixels // 64).reshape(-1, 3).astype(np.int64)
    hist = np.bincount(
        levels[:, 0] * 16 + levels[:, 1] * 4 + levels[:, 2], weights=foreground.reshape(-1), minlength=64
    ) / max(foreground.sum(), 1)
    binary = (pixels > 127).astype(np.int64)
    colour8 = binary[..., 0] * 4 + binary[..., 1] * 2 + binary[..., 2]
    h, w = foreground.shape
    grid = np.zeros((4, 4, 8))
    for gy in range(4):
        for gx in range(4):
            cell = np.s_[gy * h // 4 : (gy + 1) * h // 4, gx * w // 4 : (gx + 1) * w // 4]
            counts = np.bincount(colour8[cell][foreground[cell]], minlength=8)
            grid[gy, gx] = counts / max(foreground[cell].size, 1)
    small = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BILINEAR), dtype=np.float64) / 255.0
    projected = np.tanh(projection @ (small.reshape(-1) - 0.5))
    return np.concatenate([hist, grid.reshape(-1), projected]).astype(np.float32)


def _attributes_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """The teacher's reading of one region: colour and shape one-hots (len(COLOURS) + len(SHAPES),)."""
    foreground = np.abs(pixels.astype(np.int16) - BACKGROUND).sum(-1) > 60
    mean = pixels[foreground].mean(0) if foreground.any() else np.array(BACKGROUND, dtype=np.float64)
    colour = int(np.argmin([np.abs(mean - c).sum() for c in COLOURS.values()]))
    fill = foreground.mean()
    shape = int(np.argmin([abs(fill - FILL[s]) for s in SHAPES]))
    out = np.zeros(len(COLOURS) + len(SHAPES))
    out[colour] = out[len(COLOURS) + shape] = 1
    return out


def _attributes_from_text(caption: str) -> np.ndarray:
    """The teacher's reading of a caption: counts of the colour and shape words it names."""
    words = caption.split()
    return np.array([words.count(c) for c in COLOURS] + [words.count(s) for s in SHAPES], dtype=np.float64)


def write_demo_data(directory: Path, images: int = 600, seed: int = 0, save_images: bool = False) -> Path:
    """Generate `images` scenes into `directory` in the pair format; returns `directory`.

    Writes captions.jsonl, images.safetensors, regions.safetensors, teacher.safetensors (and
    the PNGs under images/ with `save_images`). Same arguments, same bytes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((64, 16 * 16 * 3)) / np.sqrt(16 * 16 * 3 / 12)
    teacher_matrix = rng.standard_normal((TEACHER_DIM, len(COLOURS) + len(SHAPES)))
    image_features, region_features, boxes, region_image, teacher_image, teacher_text = [], [], [], [], [], []
    lines = []
    if save_images:
        (directory / "images").mkdir(exist_ok=True)
    for i in range(images):
        objects = _scene(rng)
        pixels = _render(objects, rng)
        if save_images:
            Image.fromarray(pixels).save(directory / "images" / f"{i:05d}.png")
        image_features.append(pixel_features(pixels, projection))
        first_region = len(region_features)
        seen = np.zeros(len(COLOURS) + len(SHAPES))
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            crop = pixels[y0:y1, x0:x1]
            region_features.append(pixel_features(crop, projection))
            boxes.append(o["box"])
            region_image.append(i)
            seen += _attributes_from_pixels(crop)
        teacher_image.append(teacher_matrix @ seen)
        for caption, spans in _captions(objects, rng):
            teacher_text.append(teacher_matrix @ _attributes_from_text(caption))
            phrases = [{"start": s, "end": e, "region": first_region + int(o)} for s, e, o in spans]
            lines.append(json.dumps({"image": i, "caption": caption, "phrases": phrases}))
    (directory / "captions.jsonl").write_text("\n".join(lines) + "\n")
    tensor = lambda x, dtype=torch.float32: torch.tensor(np.asarray(x), dtype=dtype)  # noqa: E731
    save_file({"features": tensor(image_features)}, directory / "images.safetensors")
    save_file(
        {"features": tensor(region_features), "boxes": tensor(boxes), "image": tensor(region_image, torch.int64)},
        directory / "regions.safetensors",
    )
    save_file({"image": tensor(teacher_image), "text": tensor(teacher_text)}, directory / "teacher.safetensors")
    return directory
