"""The hang doctor's pieces without MPI: the call record and the report built from ranks' statuses."""
from distml.comm import CallRecord, describe_call
from distml.watchdog import first_difference, format_report


def _status(rank, calls, in_call, seconds=31.0, context="epoch 1 step 12"):
    return {"rank": rank, "calls": calls, "in_call": in_call, "seconds": seconds, "context": context}


def test_call_record_numbers_calls_and_keeps_the_last_few():
    record = CallRecord(keep=3)
    for step in range(5):
        record.context = f"epoch 1 step {step + 1}"
        record.enter("allreduce", 64, "bucket 1 of 1")
        record.leave()
    record.enter("broadcast", 8)
    assert record.seq == 6
    assert [c[0] for c in record.recent] == [3, 4, 5]  # the oldest fell out
    assert describe_call(record.recent[-1]) == "allreduce #5 (epoch 1 step 5, bucket 1 of 1)"
    assert describe_call(record.current) == "broadcast #6 (epoch 1 step 5)"


def test_first_difference_finds_the_call_a_rank_has_not_entered():
    shared = [(s, "allreduce", 4, f"epoch 1 step {s}, bucket 1 of 1") for s in range(40, 57)]
    waiting = _status(0, shared + [(57, "allreduce", 4, "epoch 1 step 57, bucket 1 of 1")], True)
    computing = _status(1, shared[5:], False)  # its record holds fewer old calls: they are not compared
    seq, entries = first_difference([waiting, computing])
    assert seq == 57
    assert entries == {0: ("allreduce", "epoch 1 step 57, bucket 1 of 1"), 1: None}


def test_first_difference_finds_ranks_in_different_calls_with_the_same_number():
    a = _status(0, [(12, "broadcast", 8, "evaluation after epoch 1")], True)
    b = _status(1, [(12, "allreduce", 4, "epoch 2 step 1, bucket 1 of 1")], True)
    assert first_difference([a, b])[0] == 12
    assert first_difference([a, _status(1, [(12, "broadcast", 8, "evaluation after epoch 1")], True)]) is None


def test_report_names_every_rank_and_who_did_not_answer():
    calls = [(56, "allreduce", 4, "epoch 1 step 11, bucket 3 of 4")]
    statuses = {0: _status(0, calls + [(57, "allreduce", 4, "epoch 1 step 12, bucket 3 of 4")], True),
                1: _status(1, calls, False, seconds=32.4)}
    report = format_report(statuses, 3, 30)
    lines = report.splitlines()
    assert lines[1] == "  rank 0 has waited 31 s in allreduce #57 (epoch 1 step 12, bucket 3 of 4)"
    assert lines[2] == ("  rank 1 is in no MPI call: busy in epoch 1 step 12 for 32 s; its last call was "
                        "allreduce #56 (epoch 1 step 11, bucket 3 of 4)")
    assert lines[3] == "  rank 2 did not answer (dead, unreachable, or stuck outside Python)"
    assert lines[4] == ("distml: watchdog: the ranks' calls first differ at #57: rank 0 entered allreduce "
                        "(epoch 1 step 12, bucket 3 of 4); rank 1 has not entered it")
    assert lines[-1] == "distml: watchdog: aborting all ranks (exit 124)"


def test_report_names_the_ranks_each_rank_cannot_reach():
    call = [(40, "allreduce", 4, "epoch 1 step 5, bucket 1 of 1")]
    statuses = {0: {**_status(0, call, True), "unreachable": []},
                1: {**_status(1, call, True), "unreachable": [2]},
                2: {**_status(2, call, True), "unreachable": [1]}}
    lines = format_report(statuses, 3, 3).splitlines()
    assert lines[4] == ("  rank 1 cannot reach rank(s) 2 (no answer to a ping in 2 s: a broken link or a network "
                        "partition between them)")
    assert lines[5].startswith("  rank 2 cannot reach rank(s) 1 (")
    assert not any("rank 0 cannot" in line for line in lines)
