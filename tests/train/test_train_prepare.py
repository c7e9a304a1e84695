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


@pytest.mark.parametrize(
    "text, phrases",
    [
        ("a man in a red shirt riding a horse .", ["a man", "a red shirt", "a horse"]),
        ("Two dogs are playing with the ball in a park", ["Two dogs", "the ball", "a park"]),
        ("An old woman sits on the bench next to a building", ["An old woman", "the bench", "a building"]),
        ("there is a large red circle and a blue square .", ["a large red circle", "a blue square"]),
        ("people walking", []),
    ],
)
def test_noun_phrases(text, phrases):
    assert [text[s:e] for s, e in noun_phrases(text)] == phrases


def _tiny_models(root):
    """ResNet, CLIP and OWL-ViT, 1-2 layers of width 8-16, with a character-level CLIP tokenizer."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ConvNextImageProcessor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
        ResNetConfig,
        ResNetModel,
    )

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
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    square = {"height": 32, "width": 32}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)).save_pretrained(root / "clip")
    clip_images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=square)
    CLIPProcessor(clip_images, tokenizer).save_pretrained(root / "clip")
    OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        root / "owl"
    )
    OwlViTProcessor(OwlViTImageProcessor(size=square, crop_size=square), tokenizer).save_pretrained(root / "owl")


def test_prepare_writes_a_loadable_directory(tmp_path):
    _tiny_models(tmp_path)
    scenes = write_demo_data(tmp_path / "scenes", images=3, save_images=True)
    lines = [json.loads(line) for line in (scenes / "captions.jsonl").read_text().splitlines()]
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(json.dumps({"image": f"{r['image']:05d}.png", "caption": r["caption"]}) + "\n" for r in lines)
    )
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "--images",
                str(scenes / "images"),
                "--caption-file",
                str(captions),
                "--out",
                str(out),
                "--image-model",
                str(tmp_path / "resnet"),
                "--teacher",
                str(tmp_path / "clip"),
                "--detector",
                str(tmp_path / "owl"),
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    data = load_pairs(out, regions=True, teacher=True)
    assert data.captions == [r["caption"] for r in lines] and data.image_of.tolist() == [r["image"] for r in lines]
    assert data.image_features.shape == (3, 16) and data.region_features.shape[1] == 16
    assert data.teacher_image.shape == (3, 12) and data.teacher_text.shape == (len(lines), 12)
    assert sum(len(p) for p in data.phrases) == len(data.region_features) > 0
    assert (data.region_boxes[:, 2:] <= 96).all() and (data.region_boxes >= 0).all()


def test_prepare_names_a_missing_image(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "c.jsonl").write_text('{"image": "nope.png", "caption": "a dog"}\n')
    assert (
        main(
            [
                "--images",
                str(tmp_path / "images"),
                "--caption-file",
                str(tmp_path / "c.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--image-model",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "c.jsonl:1: image" in capsys.readouterr().err


def test_keep_captions_recipes():
    from train.prepare import keep_captions

    rows = [("a.png", "a1"), ("b.png", "b1"), ("a.png", "a2"), ("a.png", "a3"), ("c.png", "c1"), ("b.png", "b2")]
    assert keep_captions(rows, "all", 0) == rows  # KDMCSE: every caption
    one = keep_captions(rows, "one", 0)  # MCSE: one random caption per image, images in first-seen order
    assert [n for n, _ in one] == ["a.png", "b.png", "c.png"] and all(c[0] == n[0] for n, c in one)
    assert one == keep_captions(rows, "one", 0)
    import random

    rng = random.Random(0)
    assert [c for _, c in one] == [
        rng.sample(["a1", "a2", "a3"], 1)[0],
        rng.sample(["b1", "b2"], 1)[0],
        rng.sample(["c1"], 1)[0],
    ]
    draws = {tuple(keep_captions(rows, "one", seed)) for seed in range(20)}
    assert len(draws) > 1  # the seed decides


def _scenes_and_captions(tmp_path, images=3):
    scenes = write_demo_data(tmp_path / "scenes", images=images, save_images=True)
    lines = [json.loads(line) for line in (scenes / "captions.jsonl").read_text().splitlines()]
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(json.dumps({"image": f"{r['image']:05d}.png", "caption": r["caption"]}) + "\n" for r in lines)
    )
    return scenes, captions, lines


def test_prepare_kdmcse_recipe_one_caption_and_teacher_images(tmp_path):
    """--captions one keeps one caption per image; without an image model the teacher's image
    features are the image features (KDMCSE's "img")."""
    _tiny_models(tmp_path)
    scenes, captions, lines = _scenes_and_captions(tmp_path)
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "--images",
                str(scenes / "images"),
                "--caption-file",
                str(captions),
                "--out",
                str(out),
                "--teacher",
                str(tmp_path / "clip"),
                "--captions",
                "one",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    data = load_pairs(out, teacher=True)
    assert data.image_of.tolist() == [0, 1, 2] and data.teacher_text.shape == (3, 12)
    assert all(c in [r["caption"] for r in lines if r["image"] == i] for i, c in enumerate(data.captions))
    torch.testing.assert_close(data.image_features, data.teacher_image)


def test_prepare_rejects_no_image_features(tmp_path, capsys):
    _, captions, _ = _scenes_and_captions(tmp_path)
    assert (
        main(
            [
                "--images",
                str(tmp_path / "scenes" / "images"),
                "--caption-file",
                str(captions),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--resnet50" in capsys.readouterr().err


# --- MCSE's ResNet-50 features (train.resnet50) ---


def test_resnet50_has_torchvisions_parameters():
    from train.resnet50 import ResNet

    model = ResNet()
    # torchvision's resnet50 has 25,557,032 parameters, 2,049,000 of them in fc (2048 x 1000 + 1000)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 - 2_049_000 and model.out_dim == 2048
    keys = set(model.state_dict())
    assert {
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.num_batches_tracked",
        "layer3.5.bn2.bias",
    } <= keys
    assert len(keys) == 320 - 2  # torchvision's resnet50 state dict minus fc.weight, fc.bias


def _transformers_to_torchvision(state):
    """transformers ResNetModel keys -> torchvision's (the same architecture)."""
    out = {}
    for key, value in state.items():
        k = key.replace("embedder.embedder.convolution", "conv1").replace("embedder.embedder.normalization", "bn1")
        if k.startswith("encoder.stages."):
            _, _, stage, _, block, rest = k.split(".", 5)
            rest = rest.replace("shortcut.convolution", "downsample.0").replace(
                "shortcut.normalization", "downsample.1"
            )
            for c in range(3):
                rest = rest.replace(f"layer.{c}.convolution", f"conv{c + 1}").replace(
                    f"layer.{c}.normalization", f"bn{c + 1}"
                )
            k = f"layer{int(stage) + 1}.{block}.{rest}"
        out[k] = value
    return out


def test_resnet_matches_transformers_resnet():
    """The architecture (v1.5 strides, shortcuts, pooling) against an independent implementation,
    with random weights and batch-norm statistics, at a small width."""
    from transformers import ResNetConfig, ResNetModel

    from train.resnet50 import ResNet

    torch.manual_seed(0)
    theirs = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1])).eval()
    for m in theirs.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    ours = ResNet(depths=(1, 2, 1, 1), width=8).eval()
    ours.load_state_dict(_transformers_to_torchvision(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 67, 53)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).pooler_output.flatten(1), rtol=1e-4, atol=1e-5)


def test_mcse_preprocess_geometry():
    import numpy as np
    from PIL import Image

    from train.resnet50 import IMAGENET_MEAN, IMAGENET_STD, _resized_size, mcse_preprocess

    assert _resized_size(300, 400, 256) == (256, 341) and _resized_size(400, 300, 256) == (341, 256)
    assert _resized_size(500, 333, 256) == (384, 256) and _resized_size(256, 256, 256) == (256, 256)
    rng = np.random.default_rng(0)
    for height in (300, 301):  # short side already 256: no resize; crop top round(38) and round(38.5) = 38
        pixels = rng.integers(0, 256, size=(height, 256, 3), dtype=np.uint8)
        x = mcse_preprocess(Image.fromarray(pixels))
        want = (
            torch.from_numpy(pixels[38:262, 16:240]).permute(2, 0, 1).float() / 255
            - torch.tensor(IMAGENET_MEAN)[:, None, None]
        ) / torch.tensor(IMAGENET_STD)[:, None, None]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        torch.testing.assert_close(x, want)


def test_mcse_preprocess_equals_torchvision():
    transforms = pytest.importorskip("torchvision.transforms")
    import numpy as np
    from PIL import Image

    from train.resnet50 import IMAGENET_MEAN, IMAGENET_STD, mcse_preprocess

    theirs = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    rng = np.random.default_rng(1)
    for size in ((500, 375), (333, 500), (256, 300), (640, 427)):
        image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
        torch.testing.assert_close(mcse_preprocess(image), theirs(image), rtol=0, atol=1e-6)


def test_resnet50_equals_torchvision():
    models = pytest.importorskip("torchvision.models")
    from train.resnet50 import ResNet

    torch.manual_seed(0)
    theirs = models.resnet50().eval()
    theirs.fc = torch.nn.Identity()
    ours = ResNet().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_prepare_mcse_recipe_resnet50_weights_file(tmp_path):
    """--resnet50 with a torchvision-style state-dict file (fc included, as resnet50-0676ba61.pth)."""
    from train.resnet50 import ResNet, ResNet50Features, mcse_preprocess

    torch.manual_seed(0)
    state = ResNet().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet50.pth")
    scenes, captions, lines = _scenes_and_captions(tmp_path, images=2)
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "--images",
                str(scenes / "images"),
                "--caption-file",
                str(captions),
                "--out",
                str(out),
                "--resnet50",
                str(tmp_path / "resnet50.pth"),
                "--captions",
                "one",
            ]
        )
        == 0
    )
    data = load_pairs(out)
    assert data.image_features.shape == (2, 2048) and len(data.captions) == 2
    from PIL import Image

    model = ResNet().eval()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    with torch.no_grad():
        want = model(mcse_preprocess(Image.open(scenes / "images" / "00001.png"))[None])
    torch.testing.assert_close(data.image_features[1:], want, rtol=1e-4, atol=1e-5)
    assert ResNet50Features(tmp_path / "resnet50.pth", 1).model.training is False
