"""STS evaluation as in SimCSE/MCSE/KDMCSE: SentEval's STS12–16, STS-B and SICK-R files, cosine
similarity of the two sentences' embeddings, Spearman correlation with the gold scores × 100.

* STS12–STS16: "all" aggregation (SimCSE's SentEval fork): the cosines and gold scores of
  every subset of the year are concatenated and one Spearman is taken over all pairs.
* STSBenchmark, SICKRelatedness: the test split (`stsb_dev` scores the STS-B dev split, for
  best-checkpoint selection).
* "avg": the mean over the tasks evaluated (the papers' 7-task average).

Data layout (SentEval's data/downstream): `STS/STS12-en-test/STS.input.<subset>.txt` (two
tab-separated sentences a line) and `STS.gs.<subset>.txt` (gold 0–5 a line; blank where the
pair has no score: skipped, as SentEval does), `STS/STSBenchmark/sts-{train,dev,test}.csv`
(tab-separated; score, sentence 1, sentence 2 in columns 5, 6, 7), `SICK/SICK_{train,trial,
test_annotated}.txt` (header line; columns sentence_A, sentence_B, relatedness_score).
Sentences are whitespace-normalised (SentEval splits on whitespace and the batcher rejoins).
`fetch_senteval(dest)` downloads these files from their original sources.
"""

from __future__ import annotations

import io
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Union

import numpy as np
import torch
from scipy.stats import spearmanr

Encode = Callable[[List[str]], torch.Tensor]
PathLike = Union[str, Path]

STS_YEARS = {
    "STS12": ("STS12-en-test", ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews")),
    "STS13": ("STS13-en-test", ("FNWN", "headlines", "OnWN")),
    "STS14": ("STS14-en-test", ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news")),
    "STS15": ("STS15-en-test", ("answers-forums", "answers-students", "belief", "headlines", "images")),
    "STS16": ("STS16-en-test", ("answer-answer", "headlines", "plagiarism", "postediting", "question-question")),
}
ALL_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")
COLUMN_NAMES = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R", "avg": "Avg."}
SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


@dataclass
class Pairs:
    """n sentence pairs and their gold scores (n,) float64."""

    first: List[str]
    second: List[str]
    gold: np.ndarray


def _read_lines(path: Path) -> List[str]:
    if not path.is_file():
        raise FileNotFoundError(f"STS data file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line_no = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line_no}: not UTF-8 text ({e})") from None


def _score(text: str, path: Path, line_no: int) -> float:
    """A gold score: a finite number, else a ValueError naming the file and line."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path} line {line_no}: gold score {text.strip()!r} is not a number") from None
    if not np.isfinite(value):
        raise ValueError(f"{path} line {line_no}: gold score {text.strip()!r} is not finite")
    return value


def _words(text: str) -> str:
    return " ".join(text.split())


def read_sts_subset(year_dir: PathLike, subset: str) -> Pairs:
    """STS.input.<subset>.txt and STS.gs.<subset>.txt; pairs with a blank gold line are dropped."""
    year_dir = Path(year_dir)
    inputs = _read_lines(year_dir / f"STS.input.{subset}.txt")
    gold = _read_lines(year_dir / f"STS.gs.{subset}.txt")
    if len(inputs) != len(gold):
        raise ValueError(
            f"{year_dir / f'STS.gs.{subset}.txt'} has {len(gold)} lines but STS.input.{subset}.txt has {len(inputs)}"
        )
    first, second, scores = [], [], []
    for line_no, (text, score) in enumerate(zip(inputs, gold), 1):
        if not score.strip():
            continue
        cols = text.split("\t")
        if len(cols) < 2:
            raise ValueError(
                f"{year_dir / f'STS.input.{subset}.txt'} line {line_no}: expected two tab-separated sentences"
            )
        first.append(_words(cols[0]))
        second.append(_words(cols[1]))
        scores.append(_score(score, year_dir / f"STS.gs.{subset}.txt", line_no))
    return Pairs(first, second, np.asarray(scores, dtype=np.float64))


def read_stsb(path: PathLike) -> Pairs:
    """An STS Benchmark split: tab-separated, score in column 5, sentences in columns 6 and 7."""
    path = Path(path)
    first, second, scores = [], [], []
    for line_no, line in enumerate(_read_lines(path), 1):
        cols = line.split("\t")
        if len(cols) < 7:
            raise ValueError(f"{path} line {line_no}: expected at least 7 tab-separated columns, got {len(cols)}")
        scores.append(_score(cols[4], path, line_no))
        first.append(_words(cols[5]))
        second.append(_words(cols[6]))
    return Pairs(first, second, np.asarray(scores, dtype=np.float64))


def read_sick(path: PathLike) -> Pairs:
    """A SICK split: header line naming sentence_A, sentence_B and relatedness_score (tab-separated)."""
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise ValueError(f"{path} is empty")
    header = lines[0].split("\t")
    try:
        a, b, y = (header.index(name) for name in ("sentence_A", "sentence_B", "relatedness_score"))
    except ValueError:
        raise ValueError(
            f"{path}: header must name sentence_A, sentence_B and relatedness_score, got {header}"
        ) from None
    first, second, scores = [], [], []
    for line_no, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) <= max(a, b, y):
            raise ValueError(f"{path} line {line_no}: expected {len(header)} tab-separated columns, got {len(cols)}")
        first.append(_words(cols[a]))
        second.append(_words(cols[b]))
        scores.append(_score(cols[y], path, line_no))
    return Pairs(first, second, np.asarray(scores, dtype=np.float64))


def load_task(task: str, data_dir: PathLike, split: str = "test") -> List[Pairs]:
    """The Pairs of a task: one per subset for STS12–16 (test only), one for STS-B / SICK-R."""
    root = Path(data_dir)
    if task in STS_YEARS:
        if split != "test":
            raise ValueError(f"split: {task} has only a test split, got {split!r}")
        folder, subsets = STS_YEARS[task]
        return [read_sts_subset(root / "STS" / folder, s) for s in subsets]
    if split not in SICK_FILES:
        raise ValueError(f"split must be one of {tuple(SICK_FILES)}, got {split!r}")
    if task == "STSBenchmark":
        return [read_stsb(root / "STS" / "STSBenchmark" / f"sts-{split}.csv")]
    if task == "SICKRelatedness":
        return [read_sick(root / "SICK" / SICK_FILES[split])]
    raise ValueError(f"tasks: unknown task {task!r}; known: {', '.join(ALL_TASKS)}")


def cosine_scores(encode: Encode, pairs: Sequence[Pairs]) -> List[np.ndarray]:
    """Cosine of each pair's embeddings, (n,) float64 per Pairs; each distinct sentence is encoded once."""
    sentences = list(dict.fromkeys(s for p in pairs for s in (*p.first, *p.second)))
    emb = encode(sentences)
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != len(sentences):
        raise ValueError(
            f"encode must return a tensor (n, d) for n = {len(sentences)} sentences, "
            f"got {getattr(emb, 'shape', type(emb).__name__)}"
        )
    emb = torch.nn.functional.normalize(emb.detach().to("cpu", torch.float64), dim=1)
    row = {s: i for i, s in enumerate(sentences)}
    out = []
    for p in pairs:
        a = emb[[row[s] for s in p.first]]
        b = emb[[row[s] for s in p.second]]
        out.append((a * b).sum(1).numpy())
    return out


def spearman100(pred: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rank correlation × 100."""
    return float(spearmanr(pred, gold).correlation) * 100.0


def score_task(encode: Encode, task: str, data_dir: PathLike, split: str = "test") -> float:
    """Spearman × 100 of one task; for STS12–16 over all subsets' pairs concatenated ("all")."""
    pairs = load_task(task, data_dir, split)
    pred = np.concatenate(cosine_scores(encode, pairs))
    gold = np.concatenate([p.gold for p in pairs])
    return spearman100(pred, gold)


def evaluate_sts(encode: Encode, data_dir: PathLike, tasks: Sequence[str] = ALL_TASKS) -> Dict[str, float]:
    """{task: Spearman × 100} for `tasks` plus "avg", their mean."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty sequence of task names, got {tasks!r}")
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown task(s) {unknown}; known: {', '.join(ALL_TASKS)}")
    results = {task: score_task(encode, task, data_dir) for task in tasks}
    results["avg"] = float(np.mean(list(results.values())))
    return results


def stsb_dev(encode: Encode, data_dir: PathLike) -> float:
    """STS-B dev Spearman × 100: the best-checkpoint criterion during training."""
    return score_task(encode, "STSBenchmark", data_dir, split="dev")


def sts_table(results: Dict[str, Dict[str, float]]) -> str:
    """Markdown table, one row per model/run: the columns of ALL_TASKS present in any row, then Avg."""
    if not results:
        raise ValueError("results is empty")
    present = {t for r in results.values() for t in r}
    columns = [t for t in ALL_TASKS if t in present] + (["avg"] if "avg" in present else [])
    lines = [
        "| model | " + " | ".join(COLUMN_NAMES.get(c, c) for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in results.items():
        cells = [f"{row[c]:.2f}" if c in row else "–" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Original sources, as SentEval's data/get_transfer_data.bash lists them.
SOURCES = {
    "STS12": "http://ixa2.si.ehu.es/stswiki/images/4/40/STS2012-en-test.zip",
    "STS13": "http://ixa2.si.ehu.es/stswiki/images/2/2f/STS2013-en-test.zip",
    "STS14": "http://ixa2.si.ehu.es/stswiki/images/8/8c/STS2014-en-test.zip",
    "STS15": "http://ixa2.si.ehu.es/stswiki/images/d/da/STS2015-en-test.zip",
    "STS16": "http://ixa2.si.ehu.es/stswiki/images/9/98/STS2016-en-test.zip",
    "STSBenchmark": "http://ixa2.si.ehu.es/stswiki/images/4/48/Stsbenchmark.tar.gz",
    "SICK": "https://raw.githubusercontent.com/alvations/stasis/master/SICK-data/",
}


def _download(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"could not download {url}: {exc}. Without network access, copy SentEval's "
            "data/downstream (after its get_transfer_data.bash) and pass that directory"
        ) from exc


def fetch_senteval(dest: PathLike, timeout: float = 60.0) -> Path:
    """Download STS12–16, STS-B and SICK into `dest` in the layout above; returns `dest`.

    Files are renamed into SentEval's layout but not Moses-tokenized or lowercased as SentEval's
    script does, so scores can differ slightly from the published ones. Raises RuntimeError
    naming the URL when a download fails.
    """
    dest = Path(dest)
    for year, (folder, _) in STS_YEARS.items():
        out = dest / "STS" / folder
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(_download(SOURCES[year], timeout))) as archive:
            for member in archive.namelist():
                name = Path(member).name.replace("STS2016.", "STS.")
                if name.startswith(("STS.input.", "STS.gs.")) and name.endswith(".txt"):
                    (out / name).write_bytes(archive.read(member))
    out = dest / "STS" / "STSBenchmark"
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(_download(SOURCES["STSBenchmark"], timeout))) as archive:
        for member in archive.getmembers():
            if Path(member.name).name in ("sts-train.csv", "sts-dev.csv", "sts-test.csv"):
                (out / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    out = dest / "SICK"
    out.mkdir(parents=True, exist_ok=True)
    for name in SICK_FILES.values():
        (out / name).write_bytes(_download(SOURCES["SICK"] + name, timeout))
    return dest
