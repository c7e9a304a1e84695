"""`python -m train.prepare`: a folder of images and a captions file -> an image-caption directory.

    python -m train.prepare --images DIR --caption-file captions.jsonl --out DIR
        (--resnet50 WEIGHTS | --image-model PATH | --teacher CLIP_PATH alone)
        [--captions one|all] [--seed 0] [--teacher CLIP_PATH] [--detector OWLVIT_PATH] [--batch-size 32]

Input captions: JSONL, one `{"image": "<file name in DIR>", "caption": "..."}` a line.
Output (docs/training.md): captions.jsonl (image ids, phrases), images.safetensors, and with
`--teacher` teacher.safetensors (KDMCSE), with `--detector` regions.safetensors (MCSEO).

The papers' recipes (Flickr30k Entities train split, 29,783 images):
- MCSE: `--captions one --resnet50 resnet50-0676ba61.pth`: one random caption per image
  (its prepare_flickr.py: `random.sample(sentences, 1)`, here from `--seed`), torchvision
  ResNet-50 IMAGENET1K_V1 features (train.resnet50).
- KDMCSE: `--captions all --teacher <CLIP ViT-L/14 directory>`: every caption, the CLIP
  image and caption features as teacher, the CLIP image features also as images.safetensors
  (KDMCSE's "img" is that feature).

- `--captions`: `all` keeps every caption; `one` keeps one per image, drawn with
  random.Random(seed).sample(captions of the image, 1) image after image in first-seen order.
- image features: `--resnet50` a torchvision ResNet-50 state-dict file (MCSE's extractor);
  `--image-model` a local transformers directory: a CLIP model (its image embedding) or a
  vision backbone (its pooled output); neither: the teacher's image features.
- teacher features: a CLIP model's image and text embeddings, unnormalised.
- phrases: `noun_phrases`, a rule-based chunker (no model, no download).
- regions: an open-vocabulary detector (OWL-ViT) queried with each caption's phrases; each
  phrase's best box becomes a region of its image, its features those of the crop through
  the image model. Every phrase so has its matched region.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from safetensors.torch import save_file

from train.data import DataError

# Words that open a noun phrase, and words that end one (the chunker's whole grammar).
DETERMINERS = frozenset(
    "a an the this that these those some several many few his her their its my our your one two three four "
    "five six seven eight nine ten another each every".split()
)
BREAKS = frozenset(
    "is are was were be been being has have had does do did and or but while as with without in on at of to for "
    "from by near under over above below behind beside between into onto through across along around against "
    "who which where when there here it they he she we you i next "
    "sits sit stands stand walks walk runs run looks look plays play holds hold wears wear rides ride jumps jump "
    "sleeps sleep eats eat lies lie waits wait carries carry watches watch".split()
)
ING_NOUNS = frozenset(
    "building clothing ceiling painting thing something nothing evening morning ring king string "
    "swing wing sibling railing awning stuffing wedding".split()
)
WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*")


def noun_phrases(text: str) -> List[Tuple[int, int]]:
    """Character spans [start, end) of the determiner-led noun phrases of an English caption.

    A phrase starts at a determiner or number ("a", "the", "two") and takes the following words
    up to a preposition, conjunction, auxiliary, pronoun, a verb in -ing or punctuation:
    "a man in a red shirt riding a horse ." -> "a man", "a red shirt", "a horse".
    """
    words = [(m.start(), m.end(), m.group().lower()) for m in WORD.finditer(text)]
    spans = []
    i = 0
    while i < len(words):
        start, end, word = words[i]
        if word not in DETERMINERS:
            i += 1
            continue
        j = i + 1
        while j < len(words):
            s, e, w = words[j]
            gap = text[words[j - 1][1] : s]
            if gap.strip() or w in BREAKS or w in DETERMINERS or (w.endswith("ing") and w not in ING_NOUNS):
                break
            end = e
            j += 1
        if j > i + 1:
            spans.append((start, end))
        i = j
    return spans


def keep_captions(rows: Sequence[Tuple[str, str]], mode: str, seed: int) -> List[Tuple[str, str]]:
    """The (image, caption) rows to train on: all of them, or (mode "one") one per image drawn
    with random.Random(seed).sample(captions, 1) (MCSE's prepare_flickr.py), images in
    first-seen order."""
    if mode == "all":
        return list(rows)
    if mode != "one":
        raise ValueError(f"captions must be 'one' or 'all', got {mode!r}")
    by_image: Dict[str, List[str]] = {}
    for name, caption in rows:
        by_image.setdefault(name, []).append(caption)
    rng = random.Random(seed)
    return [(name, rng.sample(captions, 1)[0]) for name, captions in by_image.items()]


def _read_captions(path: Path, images: Path) -> Tuple[List[str], List[str]]:
    """(image file names in first-seen order, [(image name, caption)])."""
    names: Dict[str, int] = {}
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, caption = record["image"], record["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{path}:{number}: expected {{"image": "<file>", "caption": "..."}}') from None
        if not (images / name).is_file():
            raise DataError(f"{path}:{number}: image {images / name} not found")
        names.setdefault(name, len(names))
        rows.append((name, caption))
    if not rows:
        raise DataError(f"{path}: no captions")
    return list(names), rows


class ImageEncoder:
    """Images -> (n, d) features with a local transformers model (CLIP or a vision backbone)."""

    def __init__(self, path: Path, batch_size: int):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPModel

        self.processor = AutoImageProcessor.from_pretrained(path)
        self.clip = AutoConfig.from_pretrained(path).model_type == "clip"
        self.model = (CLIPModel if self.clip else AutoModel).from_pretrained(path).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[i : i + self.batch_size]), return_tensors="pt")["pixel_values"]
            if self.clip:
                out.append(_tensor(self.model.get_image_features(pixel_values=pixels)))
            else:
                result = self.model(pixel_values=pixels)
                pooled = getattr(result, "pooler_output", None)
                out.append((pooled if pooled is not None else result.last_hidden_state.mean(1)).flatten(1))
        return torch.cat(out).float()


def _tensor(x) -> torch.Tensor:
    """A features tensor from a get_*_features result (a tensor, or an output with pooler_output)."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


@torch.no_grad()
def teacher_features(
    path: Path, images: Sequence[Image.Image], captions: Sequence[str], batch_size: int
) -> Dict[str, torch.Tensor]:
    """CLIP image (images, dt) and text (captions, dt) embeddings, unnormalised."""
    from transformers import CLIPModel, CLIPProcessor

    processor, model = CLIPProcessor.from_pretrained(path), CLIPModel.from_pretrained(path).eval()
    image = [
        _tensor(model.get_image_features(**processor(images=list(images[i : i + batch_size]), return_tensors="pt")))
        for i in range(0, len(images), batch_size)
    ]
    text = [
        _tensor(
            model.get_text_features(
                **processor(text=list(captions[i : i + batch_size]), padding=True, truncation=True, return_tensors="pt")
            )
        )
        for i in range(0, len(captions), batch_size)
    ]
    return {"image": torch.cat(image).float(), "text": torch.cat(text).float()}


class Detector:
    """OWL-ViT from a local directory: detector(image, queries) -> the best box for each query,
    (len(queries), 4) pixels x0, y0, x1, y1."""

    def __init__(self, path: Path):
        from transformers import OwlViTForObjectDetection, OwlViTProcessor

        self.processor = OwlViTProcessor.from_pretrained(path)
        self.model = OwlViTForObjectDetection.from_pretrained(path).eval()

    @torch.no_grad()
    def __call__(self, image: Image.Image, queries: List[str]) -> torch.Tensor:
        out = self.model(**self.processor(text=[queries], images=image, return_tensors="pt"))
        best = out.logits[0].argmax(0)  # (queries,): the box with the highest score for each query
        cx, cy, w, h = out.pred_boxes[0, best].unbind(-1)  # normalised to the padded square input
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * max(image.size)
        return boxes.clamp(min=0).minimum(torch.tensor([image.width, image.height] * 2, dtype=boxes.dtype))


def prepare(
    images_dir: Path,
    captions_file: Path,
    out: Path,
    image_model: Optional[Path] = None,
    teacher: Optional[Path] = None,
    detector: Optional[Path] = None,
    batch_size: int = 32,
    resnet50: Optional[Path] = None,
    captions: str = "all",
    seed: int = 0,
) -> Path:
    """Write the image-caption directory `out` (see the module docstring); returns `out`."""
    if sum(x is not None for x in (image_model, resnet50)) > 1 or not (image_model or resnet50 or teacher):
        raise ValueError("give one of --resnet50 and --image-model, or --teacher alone (its image features)")
    if detector is not None and image_model is None and resnet50 is None:
        raise ValueError("--detector needs --resnet50 or --image-model for the region features")
    names, rows = _read_captions(Path(captions_file), Path(images_dir))
    rows = keep_captions(rows, captions, seed)
    pictures = [Image.open(Path(images_dir) / n).convert("RGB") for n in names]
    index = {n: i for i, n in enumerate(names)}
    if resnet50 is not None:
        from train.resnet50 import ResNet50Features

        encoder = ResNet50Features(resnet50, batch_size, "cuda" if torch.cuda.is_available() else "cpu")
    else:
        encoder = ImageEncoder(image_model, batch_size) if image_model is not None else None
    out.mkdir(parents=True, exist_ok=True)
    teacher_out = teacher_features(teacher, pictures, [c for _, c in rows], batch_size) if teacher else None
    images = encoder(pictures) if encoder is not None else teacher_out["image"]
    save_file({"features": images}, str(out / "images.safetensors"))
    records = [{"image": index[n], "caption": c, "phrases": []} for n, c in rows]
    if detector is not None:
        detect = Detector(detector)
        features, boxes, region_image = [], [], []
        for record in records:
            spans = noun_phrases(record["caption"])
            if not spans:
                continue
            picture = pictures[record["image"]]
            found = detect(picture, [record["caption"][s:e] for s, e in spans])
            for (s, e), box in zip(spans, found):
                x0, y0, x1, y1 = (int(v) for v in box.round().tolist())
                crop = picture.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
                record["phrases"].append({"start": s, "end": e, "region": len(boxes)})
                features.append(encoder([crop])[0])
                boxes.append(box)
                region_image.append(record["image"])
        if not boxes:
            raise DataError(f"{captions_file}: the chunker found no noun phrase in any caption")
        save_file(
            {
                "features": torch.stack(features),
                "boxes": torch.stack(boxes).float(),
                "image": torch.tensor(region_image),
            },
            str(out / "regions.safetensors"),
        )
    if teacher_out is not None:
        save_file(teacher_out, str(out / "teacher.safetensors"))
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of image files")
    parser.add_argument("--caption-file", type=Path, required=True, help='JSONL: {"image": "<file>", "caption": "..."}')
    parser.add_argument("--out", type=Path, required=True, help="the image-caption directory to write")
    parser.add_argument(
        "--captions",
        choices=("one", "all"),
        default="all",
        help="one random caption per image (MCSE) or every caption (KDMCSE); default all",
    )
    parser.add_argument("--seed", type=int, default=0, help="the draw of --captions one")
    parser.add_argument(
        "--resnet50",
        type=Path,
        help="torchvision ResNet-50 state dict (IMAGENET1K_V1: resnet50-0676ba61.pth): MCSE's features",
    )
    parser.add_argument("--image-model", type=Path, help="local CLIP or vision backbone directory")
    parser.add_argument(
        "--teacher",
        type=Path,
        help="local CLIP directory (KDMCSE: ViT-L/14): teacher features, and the image features "
        "when neither --resnet50 nor --image-model is given",
    )
    parser.add_argument("--detector", type=Path, help="local OWL-ViT directory: regions for the phrases (MCSEO)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        prepare(
            args.images,
            args.caption_file,
            args.out,
            args.image_model,
            args.teacher,
            args.detector,
            args.batch_size,
            args.resnet50,
            args.captions,
            args.seed,
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
