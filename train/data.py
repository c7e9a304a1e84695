"""Training data: loaders for the on-disk formats (docs/training.md), the batch schedule, collation.

Errors name the bad file (and line, or row of a feature array: non-finite features are
rejected). Every example keeps its source (file and line) for the trainer's messages. The
schedule is a pure function of (seed, epoch, sizes), the same on every rank, so that a run
resumes at any step and every rank makes the same loss calls (text-only and image-caption
batches on the same steps, as global negatives require).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file

from mmloss import IGNORE_INDEX


class DataError(ValueError):
    """A training file that is missing or does not follow its format."""


def load_text(path: Path, limit: int = 0) -> List[str]:
    """Sentences of a corpus file, one a line (blank lines skipped); the first `limit` if > 0."""
    return read_text(path, limit)[0]


def read_text(path: Path, limit: int = 0) -> Tuple[List[str], List[int]]:
    """load_text's sentences and the line number (from 1) of each."""
    path = Path(path)
    sentences, lines = [], []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{number}: not UTF-8 text ({e})") from None
                if line:
                    sentences.append(line)
                    lines.append(number)
                if limit and len(sentences) == limit:
                    break
    except OSError as e:
        raise DataError(f"{path}: cannot read the text corpus: {e}") from None
    if not sentences:
        raise DataError(f"{path}: the text corpus holds no sentence")
    return sentences, lines


def _load_arrays(
    directory: Path, name: str, required: bool
) -> Tuple[Optional[Dict[str, torch.Tensor]], Optional[Path]]:
    """(tensors, file) of `<name>.safetensors` or `<name>.npz` (named arrays), or `<name>.npy`
    as "features"; (None, None) when there is none and it is not required."""
    for suffix in (".safetensors", ".npz", ".npy"):
        path = directory / (name + suffix)
        if not path.exists():
            continue
        try:
            if suffix == ".safetensors":
                return load_file(str(path)), path
            if suffix == ".npz":
                with np.load(path) as arrays:
                    return {k: torch.from_numpy(arrays[k]) for k in arrays.files}, path
            return {"features": torch.from_numpy(np.load(path))}, path
        except Exception as e:  # noqa: BLE001  (any parse failure, reported with the file name)
            raise DataError(f"{path}: cannot read: {e}") from None
    if required:
        raise DataError(f"{directory}: no {name}.safetensors, {name}.npz or {name}.npy")
    return None, None


def _tensor(
    arrays: Dict[str, torch.Tensor], key: str, path: Path, rows: int, dims: int, dtype=torch.float32
) -> torch.Tensor:
    """arrays[key] checked to have `rows` rows (-1: any) and `dims` dimensions, and finite values."""
    if key not in arrays:
        raise DataError(f"{path}: missing array {key!r} (has {', '.join(arrays) or 'none'})")
    x = arrays[key]
    if x.dim() != dims or (rows >= 0 and x.shape[0] != rows):
        want = f"{rows} rows" if rows >= 0 else "rows"
        raise DataError(f"{path}: {key!r} has shape {tuple(x.shape)}, expected {dims} dimensions and {want}")
    if x.is_floating_point():
        finite = torch.isfinite(x)
        finite = finite.flatten(1).all(1) if x.dim() > 1 else finite
        if not bool(finite.all()):
            raise DataError(f"{path}: {key!r} row {int((~finite).nonzero()[0])} holds a non-finite value (NaN or inf)")
    return x.to(dtype)


@dataclasses.dataclass
class PairData:
    """An image-caption directory in memory. C captions, I images, R regions.

    captions: C strings; image_of (C,) image index of each caption; image_features (I, d).
    phrases: per caption, a list of (start, end, region) character spans and region indices.
    region_features (R, d), region_boxes (R, 4) pixels (x0, y0, x1, y1), region_image (R,).
    teacher_image (I, dt), teacher_text (C, dt): frozen teacher features (KDMCSE).
    where: per caption, "captions.jsonl:<line>" (its source, for messages).
    """

    captions: List[str]
    image_of: torch.Tensor
    image_features: torch.Tensor
    phrases: List[List[Tuple[int, int, int]]]
    region_features: Optional[torch.Tensor] = None
    region_boxes: Optional[torch.Tensor] = None
    region_image: Optional[torch.Tensor] = None
    teacher_image: Optional[torch.Tensor] = None
    teacher_text: Optional[torch.Tensor] = None
    where: List[str] = dataclasses.field(default_factory=list)

    @functools.cached_property
    def _by_image(self) -> Dict[int, torch.Tensor]:
        order = torch.argsort(self.region_image, stable=True)
        images, counts = torch.unique_consecutive(self.region_image[order], return_counts=True)
        return dict(zip(images.tolist(), torch.split(order, counts.tolist())))

    def regions_of(self, image: int) -> torch.Tensor:
        """Region indices of one image, ascending (empty when it has none)."""
        return self._by_image.get(image, torch.zeros(0, dtype=torch.int64))


def _read_captions(path: Path) -> List[dict]:
    if not path.exists():
        raise DataError(f"{path.parent}: no captions.jsonl")
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not a JSON object: {e}") from None
            if (
                not isinstance(record, dict)
                or not isinstance(record.get("caption"), str)
                or not isinstance(record.get("image"), int)
                or isinstance(record.get("image"), bool)
            ):
                raise DataError(f'{where}: expected {{"image": int, "caption": str, "phrases": [...]}}')
            record["where"] = where
            records.append(record)
    if not records:
        raise DataError(f"{path}: no captions")
    return records


def _phrases(record: dict, regions: Optional[torch.Tensor]) -> List[Tuple[int, int, int]]:
    """A caption's phrases checked against the caption and the region table."""
    out = []
    where = record["where"]
    phrases = record.get("phrases", [])
    if not isinstance(phrases, list):
        raise DataError(
            f'{where}: "phrases" must be a list of {{"start": int, "end": int, "region": int}}, got {phrases!r}'
        )
    for p in phrases:
        if not isinstance(p, dict) or not all(
            isinstance(p.get(k), int) and not isinstance(p.get(k), bool) for k in ("start", "end", "region")
        ):
            raise DataError(f'{where}: a phrase must be {{"start": int, "end": int, "region": int}}, got {p!r}')
        start, end, region = p["start"], p["end"], p["region"]
        if not 0 <= start < end <= len(record["caption"]):
            raise DataError(
                f"{where}: phrase span [{start}, {end}) outside the caption ({len(record['caption'])} characters)"
            )
        if regions is None:
            raise DataError(f"{where}: phrases name regions but there is no regions file")
        if not 0 <= region < len(regions):
            raise DataError(f"{where}: phrase region {region} out of range (0..{len(regions) - 1})")
        if int(regions[region]) != record["image"]:
            raise DataError(
                f"{where}: phrase region {region} belongs to image {int(regions[region])}, "
                f"not to the caption's image {record['image']}"
            )
        out.append((start, end, region))
    return out


def load_pairs(directory: Path, regions: bool = False, teacher: bool = False) -> PairData:
    """Read an image-caption directory; `regions` / `teacher` require those files (MCSEO / KDMCSE)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (data.pairs must name an image-caption directory)")
    records = _read_captions(directory / "captions.jsonl")
    arrays, path = _load_arrays(directory, "images", True)
    images = _tensor(arrays, "features", path, -1, 2)
    for r in records:
        if not 0 <= r["image"] < len(images):
            raise DataError(f"{r['where']}: image {r['image']} out of range ({len(images)} image feature rows)")
    data = PairData(
        captions=[r["caption"] for r in records],
        image_of=torch.tensor([r["image"] for r in records]),
        image_features=images,
        phrases=[],
        where=[r["where"] for r in records],
    )
    arrays, where = _load_arrays(directory, "regions", regions)
    if arrays is not None:
        data.region_features = _tensor(arrays, "features", where, -1, 2)
        n = len(data.region_features)
        data.region_boxes = _tensor(arrays, "boxes", where, n, 2)
        data.region_image = _tensor(arrays, "image", where, n, 1, torch.int64)
        if data.region_features.shape[1] != images.shape[1]:
            raise DataError(
                f"{where}: region features are {data.region_features.shape[1]}-d but image features "
                f"{images.shape[1]}-d (they share the vision head)"
            )
    data.phrases = [_phrases(r, data.region_image) for r in records]
    if regions and not any(data.phrases):
        raise DataError(f"{directory}/captions.jsonl: no caption has phrases (MCSEO needs object-phrase pairs)")
    arrays, path = _load_arrays(directory, "teacher", teacher)
    if arrays is not None:
        data.teacher_image = _tensor(arrays, "image", path, len(images), 2)
        data.teacher_text = _tensor(arrays, "text", path, len(records), 2)
    return data


def mixed_step(step: int, n_text: int, n_pairs: int) -> Tuple[str, int]:
    """The official MCSE/KDMCSE mixing (train_mix.py): ("text" | "pairs", how many batches of
    that kind came before) of global micro-step `step`, given the batches per pass of each loader.

    An epoch is n_text + n_pairs steps; its step i takes a caption batch when i % k == 0 with
    k = max(1, n_text // n_pairs) (0 would be the scripts' ZeroDivisionError), a text batch
    otherwise. Both loaders cycle: the caption loader runs through its batches more than once an
    epoch (KDMCSE on Wiki1M and every Flickr30k caption: 16.7 % of the steps), the text loader
    less. Without captions every step is a text batch, without text a caption batch.
    """
    if n_text == 0 or n_pairs == 0:
        return ("pairs" if n_text == 0 else "text"), step
    k = max(1, n_text // n_pairs)
    epoch, position = divmod(step, n_text + n_pairs)
    pairs_before = epoch * -(-(n_text + n_pairs) // k) + -(-position // k)  # steps i < position with i % k == 0
    return ("pairs", pairs_before) if position % k == 0 else ("text", step - pairs_before)


class Batches:
    """The batches of a run: global batches of `global_batch` items, this rank's share of each.

    Whole global batches only (the official loaders also take a last partial batch: one batch
    per pass at most). Each pass of a loader is a permutation from `seed`; `indices(step)` is a
    pure function of the step, so a resumed run picks up exactly where the interrupted one was.
    """

    def __init__(self, n_text: int, n_pairs: int, local_batch: int, rank: int, world: int, seed: int):
        self.local, self.rank, self.world, self.seed = local_batch, rank, world, seed
        self.global_batch = local_batch * world
        self.n_text, self.n_pairs = n_text, n_pairs
        self.text_batches, self.pair_batches = n_text // self.global_batch, n_pairs // self.global_batch
        if not self.text_batches + self.pair_batches:
            raise DataError(f"fewer examples ({max(n_text, n_pairs)}) than one global batch ({self.global_batch})")

    def __len__(self) -> int:
        """Micro-steps per epoch."""
        return self.text_batches + self.pair_batches

    def _order(self, epoch: int, n: int, salt: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000003 + epoch * 2 + salt))

    def indices(self, micro_step: int) -> Tuple[str, torch.Tensor]:
        """("text" | "pairs", this rank's example indices) of global micro-step `micro_step`."""
        kind, count = mixed_step(micro_step, self.text_batches, self.pair_batches)
        passes, b = divmod(count, self.text_batches if kind == "text" else self.pair_batches)
        order = self._order(passes, self.n_text if kind == "text" else self.n_pairs, kind == "pairs")
        start = b * self.global_batch + self.rank * self.local
        return kind, order[start : start + self.local]


def _span_weights(offsets: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(L,) mean-pooling weights over the tokens whose characters overlap [start, end)."""
    inside = (offsets[:, 1] > start) & (offsets[:, 0] < end) & (offsets[:, 1] > offsets[:, 0])
    return inside.float() / inside.sum().clamp(min=1)


class Collator:
    """Tokenizes and assembles the model's input dict of one batch (see SentenceModel.forward)."""

    def __init__(self, tokenizer, max_length: int, method: str, phrase_encoding: str, group_same_image: bool):
        self.tokenizer, self.max_length, self.method = tokenizer, max_length, method
        self.phrase_encoding, self.group_same_image = phrase_encoding, group_same_image

    def _tokens(self, texts: Sequence[str], offsets: bool = False) -> Dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_offsets_mapping=offsets,
        )

    def text(self, sentences: Sequence[str]) -> Dict[str, torch.Tensor]:
        """A text-only batch: input_ids, attention_mask (N, L)."""
        tokens = self._tokens(sentences)
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def pairs(self, data: PairData, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """An image-caption batch of captions `index`: the text inputs, image_features (N, d),
        image_ids (N,) with group_same_image, teacher features (KDMCSE), phrases (MCSEO)."""
        captions = [data.captions[i] for i in index.tolist()]
        images = data.image_of[index]
        span = self.method == "mcseo" and self.phrase_encoding == "span"
        tokens = self._tokens(captions, offsets=span)
        batch = {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "image_features": data.image_features[images],
        }
        if self.group_same_image:
            batch["image_ids"] = images
        if self.method == "kdmcse":
            batch["teacher_image"] = data.teacher_image[images]
            batch["teacher_text"] = data.teacher_text[index]
        if self.method == "mcseo":
            batch.update(self._objects(data, index, captions, tokens.get("offset_mapping")))
        return batch

    def _objects(
        self, data: PairData, index: torch.Tensor, captions: List[str], offsets: Optional[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Phrases and objects of the batch: every region of each caption's image (repeated when
        two captions share an image; region ids as object_groups keep the copies from being
        negatives), each phrase's object index; phrases cut off by truncation are ignored."""
        objects, groups, rows, weights, texts, positives = [], [], [], [], [], []
        for row, (i, caption) in enumerate(zip(index.tolist(), captions)):
            regions = data.regions_of(int(data.image_of[i]))
            local = {int(r): len(groups) + k for k, r in enumerate(regions.tolist())}
            objects.append(data.region_features[regions])
            groups += regions.tolist()
            for start, end, region in data.phrases[i]:
                if offsets is not None:
                    w = _span_weights(offsets[row], start, end)
                    weights.append(w)
                    kept = bool(w.any())
                else:
                    texts.append(caption[start:end])
                    kept = True
                rows.append(row)
                positives.append(local[region] if kept else IGNORE_INDEX)
        if not positives:  # every rank must call the loss: one ignored row
            rows, positives = [0], [IGNORE_INDEX]
            weights, texts = [torch.zeros(offsets.shape[1])] if offsets is not None else [], [captions[0]]
        out = {
            "objects": torch.cat(objects),
            "object_groups": torch.tensor(groups),
            "phrase_object": torch.tensor(positives),
            "phrase_rows": torch.tensor(rows),
        }
        if offsets is not None:
            out["phrase_weights"] = torch.stack(weights)
        else:
            tokens = self._tokens(texts)
            out["phrase_input_ids"], out["phrase_attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        return out
