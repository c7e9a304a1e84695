"""Where the evaluation and demo data come from: an explicit path, `MMLOSS_DATA`, or the bundled copy.

The repository ships the SentEval STS12–16, STS-B and SICK-R sets and the SNLI sentence
corpus as one archive, data/senteval-snli.tar.xz (data/README.md: origins and licenses). On
first use it is unpacked next to itself, into data/unpacked/, and every file is checked
against data/MANIFEST.sha256. Resolution, first match wins:

1. an explicit path (a CLI flag or a config field) to the directory or file itself;
2. the environment variable MMLOSS_DATA: a directory laid out like data/unpacked/
   (senteval/ and corpus/);
3. the bundled copy.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional, Union

PathLike = Union[str, Path]

DATA = Path(__file__).resolve().parents[1] / "data"
ARCHIVE = DATA / "senteval-snli.tar.xz"
MANIFEST = DATA / "MANIFEST.sha256"
UNPACKED = DATA / "unpacked"
CORPUS_NAME = "corpus/snli-dev-test-sentences.txt"


def manifest() -> Dict[str, str]:
    """{relative path: sha256 hex} of every bundled file, from data/MANIFEST.sha256."""
    entries = {}
    for number, line in enumerate(MANIFEST.read_text().splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise ValueError(f"{MANIFEST}:{number}: expected '<sha256>  <path>', got {line!r}")
        entries[name] = digest
    return entries


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(root: Path) -> None:
    """Raise ValueError naming the first file under `root` that is missing or differs from the manifest."""
    for name, digest in manifest().items():
        path = root / name
        if not path.is_file():
            raise ValueError(f"{path}: missing from the unpacked data (delete {root} to unpack again)")
        if sha256(path) != digest:
            raise ValueError(f"{path}: sha256 differs from {MANIFEST} (delete {root} to unpack again)")


@functools.lru_cache(maxsize=None)
def bundled_root() -> Path:
    """data/unpacked/, unpacked from the archive on first use (atomically) and verified."""
    if not UNPACKED.is_dir():
        if not ARCHIVE.is_file():
            raise FileNotFoundError(f"{ARCHIVE}: the bundled data archive is missing from this checkout")
        staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=DATA))
        with tarfile.open(ARCHIVE, "r:xz") as archive:
            archive.extractall(staging, filter="data")
        try:
            staging.rename(UNPACKED)
        except OSError:  # another process unpacked it first
            if not UNPACKED.is_dir():
                raise
    verify(UNPACKED)
    return UNPACKED


def data_root() -> Path:
    """MMLOSS_DATA when set (it must exist), else the bundled copy."""
    env = os.environ.get("MMLOSS_DATA")
    if env:
        root = Path(env)
        if not root.is_dir():
            raise FileNotFoundError(f"MMLOSS_DATA={env}: not a directory")
        return root
    return bundled_root()


def senteval_dir(explicit: Optional[PathLike] = None) -> Path:
    """The SentEval downstream directory (STS/, SICK/)."""
    return Path(explicit) if explicit else data_root() / "senteval"


def corpus_file(explicit: Optional[PathLike] = None) -> Path:
    """The SNLI sentence corpus, one sentence a line."""
    return Path(explicit) if explicit else data_root() / CORPUS_NAME
