"""Run reports: Markdown tables and PNG plots written into a run directory.

`write_report(run_dir, sts=..., retrieval=..., log_file=...)` writes `report.md` with
* the STS table (train.sts.sts_table) and `sts.png` (Spearman × 100 per task, one bar per run),
* the retrieval table and `retrieval.png` (Recall@K per direction, one bar per run),
* `loss.png`: every numeric field but "step" of a JSONL training log ({"step": int, part: float, ...}
  a line) against step,
each part only when its input is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train.sts import ALL_TASKS, COLUMN_NAMES, sts_table  # noqa: E402

PathLike = Union[str, Path]
Results = Dict[str, Dict[str, float]]


def read_log(path: PathLike) -> List[dict]:
    """The records of a JSONL log (blank lines skipped); each must have an integer "step"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"log file not found: {path}")
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path} line {line_no}: expected a JSON object with an integer 'step'")
        records.append(record)
    return records


def plot_loss_parts(records: Sequence[dict], out: PathLike, parts: Optional[Sequence[str]] = None) -> Path:
    """Line plot of each part (default: every numeric field but "step") against step; returns out."""
    if parts is None:
        parts = sorted(
            {
                k
                for r in records
                for k, v in r.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
    fig, ax = plt.subplots(figsize=(7, 4))
    for part in parts:
        points = [(r["step"], r[part]) for r in records if part in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=part)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss parts per step")
    if parts:
        ax.legend()
    return _save(fig, out)


def _grouped_bars(
    results: Results, columns: Sequence[str], labels: Sequence[str], ylabel: str, title: str, out: PathLike
) -> Path:
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(columns) * max(1, len(results)) ** 0.5), 4))
    width = 0.8 / max(1, len(results))
    for r, (name, row) in enumerate(results.items()):
        xs = [c + r * width for c in range(len(columns))]
        ax.bar(xs, [row.get(col, 0.0) for col in columns], width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, out)


def plot_sts(results: Results, out: PathLike) -> Path:
    """Bars of Spearman × 100 per STS task (and the average), one colour per run."""
    present = {t for r in results.values() for t in r}
    columns = [t for t in ALL_TASKS if t in present] + (["avg"] if "avg" in present else [])
    return _grouped_bars(results, columns, [COLUMN_NAMES.get(c, c) for c in columns], "Spearman x 100", "STS", out)


def retrieval_columns(results: Results) -> List[str]:
    """The Recall@K keys present, i2t then t2i, by K; then rsum."""
    keys = {k for r in results.values() for k in r if "_R@" in k}
    ordered = sorted(keys, key=lambda k: (k.split("_R@")[0] != "i2t", int(k.split("@")[1])))
    return ordered + (["rsum"] if any("rsum" in r for r in results.values()) else [])


def retrieval_table(results: Results) -> str:
    """Markdown table, one row per run: image→text and text→image Recall@K (%) and rsum."""
    if not results:
        raise ValueError("results is empty")
    columns = retrieval_columns(results)
    header = [c.replace("i2t_", "I→T ").replace("t2i_", "T→I ") for c in columns]
    lines = ["| model | " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" if c in row else "–" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot_retrieval(results: Results, out: PathLike) -> Path:
    """Bars of Recall@K (%) per direction and K, one colour per run."""
    columns = [c for c in retrieval_columns(results) if c != "rsum"]
    labels = [c.replace("i2t_", "I→T ").replace("t2i_", "T→I ") for c in columns]
    return _grouped_bars(results, columns, labels, "recall (%)", "retrieval", out)


def _save(fig, out: PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def seeds_table(results: Dict[int, Dict[str, float]]) -> str:
    """Markdown table: one row per seed, then the mean and the sample standard deviation (n - 1)
    of each STS task and the average over the seeds."""
    if not results:
        raise ValueError("results is empty")
    present = {t for r in results.values() for t in r}
    columns = [t for t in ALL_TASKS if t in present] + (["avg"] if "avg" in present else [])
    lines = ["| seed | " + " | ".join(COLUMN_NAMES.get(c, c) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for seed, row in results.items():
        lines.append(f"| {seed} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    stats = {c: np.array([row[c] for row in results.values()]) for c in columns}
    std = {c: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for c, v in stats.items()}
    lines.append("| mean ± std | " + " | ".join(f"{stats[c].mean():.2f} ± {std[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_seeds_report(out_dir: PathLike, results: Dict[int, Dict[str, float]]) -> Path:
    """seeds.md (seeds_table) and seeds.json ({"runs": {seed: scores}, "mean": ..., "std": ...}) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = sorted({t for r in results.values() for t in r})
    values = {t: np.array([r[t] for r in results.values()]) for t in tasks}
    summary = {
        "runs": {str(s): r for s, r in results.items()},
        "mean": {t: float(v.mean()) for t, v in values.items()},
        "std": {t: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for t, v in values.items()},
    }
    (out_dir / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
    out = out_dir / "seeds.md"
    out.write_text(
        f"# STS over {len(results)} seeds (Spearman × 100, after training)\n\n"
        + seeds_table(results)
        + "\nEach seed's run: seed-<s>/report.md. ± is the sample standard deviation (n - 1).\n"
    )
    return out


def write_report(
    run_dir: PathLike,
    *,
    sts: Optional[Results] = None,
    retrieval: Optional[Results] = None,
    log_file: Optional[PathLike] = None,
    title: str = "Evaluation",
) -> Path:
    """Write report.md (+ sts.png, retrieval.png, loss.png for the inputs given) into run_dir; returns report.md."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"# {title}\n"]
    if sts:
        plot_sts(sts, run_dir / "sts.png")
        sections.append("## STS (Spearman × 100)\n\n" + sts_table(sts) + "\n![STS](sts.png)\n")
    if retrieval:
        plot_retrieval(retrieval, run_dir / "retrieval.png")
        sections.append(
            "## Retrieval (Recall@K, %)\n\n" + retrieval_table(retrieval) + "\n![retrieval](retrieval.png)\n"
        )
    if log_file is not None:
        records = read_log(log_file)
        plot_loss_parts(records, run_dir / "loss.png")
        sections.append(
            f"## Training loss\n\n{len(records)} logged steps from `{Path(log_file).name}`.\n\n![loss](loss.png)\n"
        )
    out = run_dir / "report.md"
    out.write_text("\n".join(sections))
    return out
