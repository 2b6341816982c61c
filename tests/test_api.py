"""distml.api pieces that need no MPI job: the aborting excepthook, with a stand-in communicator."""
import pytest

from distml import api


class _Comm:
    def __init__(self, rank, size=2):
        self.rank, self.size, self.aborted = rank, size, None

    def abort(self, code):
        self.aborted = code
        raise SystemExit(code)  # MPI Abort does not return


def _raise_into(hook, error):
    try:
        raise error
    except BaseException as caught:
        with pytest.raises(SystemExit):
            hook(type(caught), caught, caught.__traceback__)


@pytest.fixture
def no_wait(monkeypatch):
    waits = []
    monkeypatch.setattr(api.time, "sleep", waits.append)
    return waits


def test_the_failed_rank_prints_its_traceback_and_one_line_then_aborts_the_job(capsys, no_wait):
    comm = _Comm(rank=1)
    _raise_into(api.aborting_excepthook(lambda: comm, "distml.horovod"), RuntimeError("boom"))

    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().endswith("distml.horovod: rank 1 of 2 failed: RuntimeError: boom (aborting all ranks)")
    assert comm.aborted == 1 and no_wait == []


def test_an_interrupt_aborts_with_130_and_a_bare_name(capsys, no_wait):
    comm = _Comm(rank=0)
    _raise_into(api.aborting_excepthook(lambda: comm), KeyboardInterrupt())

    assert capsys.readouterr().err.rstrip().endswith("distml: rank 0 of 2 failed: KeyboardInterrupt (aborting all ranks)")
    assert comm.aborted == 130


def test_an_error_every_rank_raises_alike_is_printed_by_rank_0_only(capsys, no_wait):
    everywhere = ValueError("ranks disagree")
    everywhere.everywhere = True
    others, root = _Comm(rank=1), _Comm(rank=0)

    _raise_into(api.aborting_excepthook(lambda: others), everywhere)
    assert capsys.readouterr().err == "" and no_wait == [api._REPORT_WAIT_S] and others.aborted == 1

    _raise_into(api.aborting_excepthook(lambda: root), everywhere)
    assert "distml: rank 0 of 2 failed: ValueError: ranks disagree (aborting all ranks)" in capsys.readouterr().err
    assert root.aborted == 1
