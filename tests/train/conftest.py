"""Fixtures of the trainer tests."""

import os

import pytest

LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def launcher_environment():
    """An in-process Trainer sets the launcher variables of a one-rank run (its process group,
    which DeepSpeed caches, stays for the later in-process trainers). They are restored after
    each test, so that a training subprocess started later picks its own free port instead of
    inheriting one that this process's store still listens on."""
    before = {k: os.environ.get(k) for k in LAUNCHER}
    yield
    for k, v in before.items():
        os.environ.pop(k, None) if v is None else os.environ.update({k: v})
