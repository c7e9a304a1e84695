"""train.report: tables and PNG plots in a run directory."""

import json

import pytest

from train.report import read_log, retrieval_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"
STS = {
    "untrained": {"STS12": 60.0, "STSBenchmark": 70.0, "avg": 65.0},
    "trained": {"STS12": 70.5, "STSBenchmark": 80.25, "avg": 75.375},
}
RETRIEVAL = {"trained": {"i2t_R@1": 10.0, "i2t_R@5": 30.0, "t2i_R@1": 8.0, "t2i_R@5": 25.0, "rsum": 73.0}}


def test_full_report(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(
        "".join(
            json.dumps({"step": s, "intra": 3.0 / (s + 1), "inter_image": 1.0 / (s + 1), "lr": 1e-5}) + "\n"
            for s in range(20)
        )
        + "\n"
    )
    out = write_report(tmp_path / "run", sts=STS, retrieval=RETRIEVAL, log_file=log)
    text = out.read_text()
    assert "| trained | 70.50 | 80.25 | 75.38 |" in text
    assert "| trained | 10.00 | 30.00 | 8.00 | 25.00 | 73.00 |" in text
    assert "20 logged steps" in text
    for name in ("sts.png", "retrieval.png", "loss.png"):
        assert f"({name})" in text
        assert (tmp_path / "run" / name).read_bytes().startswith(PNG)


def test_parts_are_optional(tmp_path):
    out = write_report(tmp_path, sts=STS)
    assert (tmp_path / "sts.png").is_file() and not (tmp_path / "loss.png").exists()
    assert "Retrieval" not in out.read_text()


def test_retrieval_table_orders_columns():
    table = retrieval_table({"r": {"t2i_R@1": 1.0, "i2t_R@10": 3.0, "i2t_R@5": 2.0, "rsum": 6.0}})
    assert table.splitlines()[0] == "| model | I→T R@5 | I→T R@10 | T→I R@1 | rsum |"


def test_log_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_log(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2}\n{"loss": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_log(bad)
