"""Export an encoder (train.encoders.TransformersEncoder) for use outside this project.

* `export_transformers(encoder, out)`: a transformers model directory (config, weights,
  tokenizer): `AutoModel.from_pretrained(out)`.
* `export_sentence_transformers(encoder, out)`: the same files plus a sentence-transformers
  Transformer module (max_seq_length = the encoder's max_length) and a Pooling module with the
  encoder's pooling ("cls" or "mean"), then a Dense module with the encoder's head (a Linear +
  Tanh: SimCSE's "cls" pooling) when it has one, so that `SentenceTransformer(out).encode(sentences)`
  gives the embeddings the evaluator computed (no normalisation module: cosine scores are the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from train.encoders import TransformersEncoder

PathLike = Union[str, Path]


def export_transformers(encoder: TransformersEncoder, out_dir: PathLike) -> Path:
    """Save the encoder's model and tokenizer into out_dir (created); returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(str(out_dir))
    encoder.tokenizer.save_pretrained(str(out_dir))
    return out_dir


def export_sentence_transformers(encoder: TransformersEncoder, out_dir: PathLike) -> Path:
    """Save a sentence-transformers model directory (Transformer + Pooling) into out_dir; returns it."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Transformer

    out_dir = export_transformers(encoder, out_dir)
    transformer = Transformer(str(out_dir), max_seq_length=encoder.max_length)
    modules = [transformer, Pooling(encoder.model.config.hidden_size, pooling_mode=encoder.pooling)]
    if encoder.head is not None:
        linear = encoder.head[0]
        dense = Dense(linear.in_features, linear.out_features, activation_function=torch.nn.Tanh())
        dense.linear.load_state_dict(linear.state_dict())
        modules.append(dense)
    SentenceTransformer(modules=modules, device="cpu").save(str(out_dir))
    return out_dir
