"""The bundled data: unpacked files match the manifest, and the resolution order holds."""

import pytest

from train import datasets


def test_bundled_files_match_the_manifest():
    root = datasets.bundled_root()
    names = datasets.manifest()
    assert len(names) == 64
    for name, digest in names.items():
        assert datasets.sha256(root / name) == digest, name


def test_verify_names_a_changed_file(tmp_path):
    root = tmp_path / "copy"
    for name in datasets.manifest():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes((datasets.bundled_root() / name).read_bytes())
    datasets.verify(root)
    changed = root / datasets.CORPUS_NAME
    changed.write_text("not the corpus\n")
    with pytest.raises(ValueError, match="snli-dev-test-sentences.txt: sha256 differs"):
        datasets.verify(root)


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MMLOSS_DATA", raising=False)
    assert datasets.senteval_dir() == datasets.bundled_root() / "senteval"
    monkeypatch.setenv("MMLOSS_DATA", str(tmp_path))
    assert datasets.senteval_dir() == tmp_path / "senteval"
    assert datasets.corpus_file() == tmp_path / datasets.CORPUS_NAME
    assert datasets.senteval_dir(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.setenv("MMLOSS_DATA", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="MMLOSS_DATA="):
        datasets.data_root()


def test_nothing_reads_outside_the_repository():
    """No source, test, script or doc names the sibling folder the data once came from."""
    from tests.repo import REPO

    suffixes = {".py", ".sh", ".md", ".yaml", ".toml", ".txt", ".cpp", ".h", ".cu", ".cuh"}
    offenders = []
    for path in REPO.rglob("*"):
        parts = path.relative_to(REPO).parts
        if path.suffix not in suffixes or parts[0] in {".venv", "build", "data", ".git", "runs"}:
            continue
        if "../" + "shared" in path.read_text(errors="replace"):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders
