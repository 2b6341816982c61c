"""Unit tests for `distml.signals.StopFlag`: handlers that only set a flag."""
import os
import signal

import pytest

from distml.signals import STOP_SIGNALS, StopFlag


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_a_stop_signal_only_sets_the_flag_to_the_first_signal(restore_handlers, sig):
    with StopFlag() as flag:
        assert flag.requested is None
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGUSR2)  # a second one changes nothing
        assert flag.requested == sig.name


def test_without_a_signal_the_previous_handlers_come_back(restore_handlers):
    mine = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGUSR1, mine)

    with StopFlag():
        assert signal.getsignal(signal.SIGUSR1) is not mine

    assert signal.getsignal(signal.SIGUSR1) is mine


def test_with_ignore_after_late_repeats_of_the_signal_are_ignored(restore_handlers):
    with StopFlag(ignore_after=True):  # what the CLI holds from its start to its exit
        os.kill(os.getpid(), signal.SIGUSR1)

    # scancel --full delivers USR1 more than once; its default action would kill the process
    assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
    os.kill(os.getpid(), signal.SIGUSR1)  # still alive


def test_the_cli_called_in_process_leaves_the_handlers_as_it_found_them(restore_handlers, capsys):
    # Ignored signals are inherited by child processes (bash cannot even trap them): main() called
    # from a test or a user's program must not leave them ignored.
    from distml.cli import main
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    assert main(["train", "--epochs", "0"]) == 2

    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
