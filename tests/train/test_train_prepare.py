"""`python -m train.prepare` with tiny randomly initialised ResNet, CLIP and OWL-ViT models built
here (nothing downloaded): its output loads as an MCSEO + KDMCSE image-caption directory. And
the noun-phrase chunker."""

from __future__ import annotations

import json
import string

import pytest
import torch

from train.data import load_pairs
from train.demo_data import write_demo_data
from train.prepare import main, noun_phrases


@pytest.mark.parametrize("text, phrases", [
    ("a man in a red shirt riding a horse .", ["a man", "a red shirt", "a horse"]),
    ("Two dogs are playing with the ball in a park", ["Two dogs", "the ball", "a park"]),
    ("An old woman sits on the bench next to a building", ["An old woman", "the bench", "a building"]),
    ("there is a large red circle and a blue square .", ["a large red circle", "a blue square"]),
    ("people walking", []),
])
def test_noun_phrases(text, phrases):
    assert [text[s:e] for s, e in noun_phrases(text)] == phrases


def _tiny_models(root):
    """ResNet, CLIP and OWL-ViT, 1-2 layers of width 8-16, with a character-level CLIP tokenizer."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
                              ConvNextImageProcessor, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor,
                              OwlViTProcessor, ResNetConfig, ResNetModel)

    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(root / "resnet")
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(root / "resnet")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,'-":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=64)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    square = {"height": 32, "width": 32}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).save_pretrained(root / "clip")
    clip_images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=square)
    CLIPProcessor(clip_images, tokenizer).save_pretrained(root / "clip")
    OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        root / "owl")
    OwlViTProcessor(OwlViTImageProcessor(size=square, crop_size=square), tokenizer).save_pretrained(root / "owl")


def test_prepare_writes_a_loadable_directory(tmp_path):
    _tiny_models(tmp_path)
    scenes = write_demo_data(tmp_path / "scenes", images=3, save_images=True)
    lines = [json.loads(line) for line in (scenes / "captions.jsonl").read_text().splitlines()]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image": f"{r['image']:05d}.png", "caption": r["caption"]}) + "\n"
                                for r in lines))
    out = tmp_path / "prepared"
    assert main(["--images", str(scenes / "images"), "--caption-file", str(captions), "--out", str(out),
                 "--image-model", str(tmp_path / "resnet"), "--teacher", str(tmp_path / "clip"),
                 "--detector", str(tmp_path / "owl"), "--batch-size", "2"]) == 0
    data = load_pairs(out, regions=True, teacher=True)
    assert data.captions == [r["caption"] for r in lines] and data.image_of.tolist() == [r["image"] for r in lines]
    assert data.image_features.shape == (3, 16) and data.region_features.shape[1] == 16
    assert data.teacher_image.shape == (3, 12) and data.teacher_text.shape == (len(lines), 12)
    assert sum(len(p) for p in data.phrases) == len(data.region_features) > 0
    assert (data.region_boxes[:, 2:] <= 96).all() and (data.region_boxes >= 0).all()


def test_prepare_names_a_missing_image(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "c.jsonl").write_text('{"image": "nope.png", "caption": "a dog"}\n')
    assert main(["--images", str(tmp_path / "images"), "--caption-file", str(tmp_path / "c.jsonl"), "--out",
                 str(tmp_path / "o"), "--image-model", str(tmp_path)]) == 2
    assert "c.jsonl:1: image" in capsys.readouterr().err
