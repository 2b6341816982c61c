"""Fixtures shared by the test files."""
import os

import pytest

from slurm_cluster import Cluster, Unavailable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A single-node SLURM cluster for the session: an idle one that already answers `sinfo`, or one
    installed (apt-get, as root on Debian) and started here, and stopped at the end by its pid files.
    Elsewhere the tests that use it are skipped with the reason; DISTML_SLURM_TESTS=0 skips them too."""
    if os.environ.get("DISTML_SLURM_TESTS") == "0":
        pytest.skip("no SLURM cluster: DISTML_SLURM_TESTS=0")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.up()
    except Unavailable as e:
        cluster.down()
        pytest.skip(f"no SLURM cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def loop_stop(monkeypatch):
    """A fresh distml.stop_requested() state for one test; the signal handlers it installs put back after."""
    from distml import api, optimizer, signals
    fresh = signals.LoopStop()
    for module in (signals, api, optimizer):
        monkeypatch.setattr(module, "LOOP_STOP", fresh)
    yield fresh
    if fresh.flag is not None:
        fresh.flag.__exit__(None, None, None)
