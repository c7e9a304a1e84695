"""train.retrieval: Recall@K in both directions against a brute-force dense computation."""

import pytest
import torch
import torch.nn.functional as F

from train.evaluate import main
from train.retrieval import evaluate_pairs_file, group_pairs, load_pairs, retrieval_recall


def brute_force(image, text, text_image, ks):
    """Definition by loops over a dense float64 cosine matrix, ties to the lower index."""
    sim = F.normalize(image.double(), dim=1) @ F.normalize(text.double(), dim=1).T
    i2t = torch.sort(sim, dim=1, descending=True, stable=True).indices
    t2i = torch.sort(sim.T, dim=1, descending=True, stable=True).indices
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = (
            100.0 * sum(any(int(text_image[j]) == i for j in i2t[i, :k]) for i in range(len(image))) / len(image)
        )
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * sum(int(text_image[t]) in t2i[t, :k].tolist() for t in range(len(text))) / len(text)
    out["rsum"] = sum(out.values())
    return out


def noisy_pairs(n_images=40, d=16, seed=0):
    """1–5 captions per image, captions = image + noise, pairs shuffled, ids non-contiguous."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, d, generator=g)
    counts = torch.randint(1, 6, (n_images,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n_images), counts)
    perm = torch.randperm(len(owner), generator=g)
    owner = owner[perm]
    text = images[owner] + 1.2 * torch.randn(len(owner), d, generator=g)
    return images[owner], text, owner * 7 + 100


def test_matches_brute_force():
    image, text, image_id = noisy_pairs()
    images, text, text_image = group_pairs(image, text, image_id)
    ks = (1, 5, 10)
    got = retrieval_recall(images, text, text_image, ks)
    want = brute_force(images, text, text_image, ks)
    assert list(got) == list(want)
    for key in want:
        assert got[key] == pytest.approx(want[key]), key
    assert 0 < got["i2t_R@1"] < 100 and 0 < got["t2i_R@1"] < 100


def test_any_caption_of_the_image_is_a_hit():
    images = torch.eye(3)
    text = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.2, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.1]])
    text_image = torch.tensor([1, 0, 2, 0])  # image 0 has captions 1 and 3
    got = retrieval_recall(images, text, text_image, ks=(1,))
    assert got == {"i2t_R@1": 100.0, "t2i_R@1": 100.0, "rsum": 200.0}


def test_k_larger_than_candidates_counts_everything():
    images, text = torch.randn(2, 4), torch.randn(3, 4)
    got = retrieval_recall(images, text, torch.tensor([0, 1, 1]), ks=(1, 10))
    assert got["i2t_R@10"] == 100.0 and got["t2i_R@10"] == 100.0


def test_group_pairs_takes_each_ids_first_row():
    image = torch.arange(10.0).reshape(5, 2)
    text = torch.randn(5, 2)
    images, same_text, text_image = group_pairs(image, text, torch.tensor([7, 3, 7, 3, 9]))
    assert torch.equal(images, image[[1, 0, 4]])  # ids in sorted order: 3, 7, 9
    assert torch.equal(text_image, torch.tensor([1, 0, 1, 0, 2]))
    assert same_text is text


def test_pairs_file_round_trip(tmp_path):
    image, text, image_id = noisy_pairs(seed=1)
    path = tmp_path / "pairs.pt"
    torch.save({"image": image, "text": text, "image_id": image_id}, path)
    got = evaluate_pairs_file(path)
    assert got == retrieval_recall(*group_pairs(image, text, image_id))
    torch.save({"image": image, "text": text}, path)
    with pytest.raises(ValueError, match="image_id"):
        load_pairs(path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pairs(tmp_path / "nope.pt")


def test_bad_inputs():
    images, text = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="without a caption"):
        retrieval_recall(images, text, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="text_image must index"):
        retrieval_recall(images, text, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="text_image must be an integer"):
        retrieval_recall(images, text, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(images, text, torch.tensor([0, 1, 2]), ks=(0,))
    with pytest.raises(ValueError, match="image_id"):
        group_pairs(images, text, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="text has 2 rows"):
        group_pairs(images, text[:2], torch.tensor([0, 1, 2]))


def test_cli(tmp_path, capsys):
    image, text, image_id = noisy_pairs(seed=2)
    torch.save({"image": image, "text": text, "image_id": image_id}, tmp_path / "feats.pt")
    assert main(["retrieval", "--pairs", str(tmp_path / "feats.pt"), "--ks", "1", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = retrieval_recall(*group_pairs(image, text, image_id), ks=(1, 5))
    assert lines[0] == "| model | I→T R@1 | I→T R@5 | T→I R@1 | T→I R@5 | rsum |"
    assert (
        lines[2] == f"| feats | {want['i2t_R@1']:.2f} | {want['i2t_R@5']:.2f} | {want['t2i_R@1']:.2f} | "
        f"{want['t2i_R@5']:.2f} | {want['rsum']:.2f} |"
    )
