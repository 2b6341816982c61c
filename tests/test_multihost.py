"""Several hosts: one rank per network namespace, MPI over TCP (scripts/emulated_cluster.py).

The same guarantees as on shared memory: the three modes give the same weights, checkpoints
resume, a preemption signal stops every host; and what only a network does: a partition is
named by the hang doctor, a lost host is survived under ULFM or named without it. Skipped with
the reason where namespaces cannot be made (not root, no `ip netns`).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import ROOT, launch, summary

sys.path.insert(0, str(ROOT / "scripts"))
import emulated_cluster  # noqa: E402

pytestmark = pytest.mark.timeout(240)

MODEL = str(ROOT / "tests" / "mpi" / "fault_model.py") + ":make"
SMALL = ("--quiet", "--threads", 1, "--batch-size", 16)  # one thread a rank: three "hosts" share two cores


@pytest.fixture(scope="module")
def three_hosts():
    reason = emulated_cluster.why_unavailable()
    if reason:
        pytest.skip(f"no emulated cluster: {reason}")
    with emulated_cluster.Cluster(3) as made:
        yield made
    assert emulated_cluster.leftovers() == []


@pytest.fixture
def cluster(three_hosts):
    """The module's three hosts, whole again and with no process left after each test."""
    yield three_hosts
    three_hosts.reset()


def mpirun(cluster, n, *args, timeout=120, env=None, mpirun_args=()):
    """`mpirun -n n --hostfile HOSTS python -m distml args` on the head: rank i on host i + 1."""
    command = ["mpirun", *mpirun_args, "-n", str(n), "--hostfile", "$DISTML_HOSTFILE", sys.executable, "-m", "distml",
               *map(str, args)]
    extra = {"PYTHONPATH": str(ROOT), **(env or {})}
    return cluster.exec(command, timeout=timeout, capture_output=True, text=True, env_extra=extra)


def start(cluster, n, *args, env=None, mpirun_args=()):
    command = ["mpirun", *mpirun_args, "-n", str(n), "--hostfile", "$DISTML_HOSTFILE", sys.executable, "-m", "distml",
               *map(str, args)]
    return cluster.start(command, env_extra={"PYTHONPATH": str(ROOT), **(env or {})})


def weights(path):
    return torch.load(path, weights_only=True)


def max_diff(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_status_names_each_host_and_info_shows_each_ranks_host(cluster):
    status = json.loads(subprocess.run([sys.executable, ROOT / "scripts" / "emulated_cluster.py", "status"],
                                       capture_output=True, text=True, check=True).stdout)
    assert [h["name"] for h in status["hosts"]] == ["node01", "node02", "node03"]
    assert [h["namespace"] for h in status["hosts"]] == ["distml-node01", "distml-node02", "distml-node03"]
    assert Path(status["hostfile"]).read_text().splitlines() == [f"node0{i} slots=1" for i in (1, 2, 3)]

    done = mpirun(cluster, 3, "info")

    assert done.returncode == 0, done.stderr
    table = done.stdout.split("launch, as each rank sees it:")[1].splitlines()
    for rank in range(3):
        row = next(line.split() for line in table if line.split()[:1] == [str(rank)])
        assert f"node0{rank + 1}" in row, done.stdout
    assert "1 rank(s) on this node" in done.stdout
    # the three hosts' threads together fit the machine's cores (one each at least), not all of them
    # each (unless the user set OMP_NUM_THREADS, which the cluster leaves alone)
    threads = int(re.search(r"(\d+) thread\(s\) per rank by default", done.stdout).group(1))
    assert "OMP_NUM_THREADS" in os.environ or 3 * threads <= max(3, len(os.sched_getaffinity(0))), done.stdout


def test_hostfile_example_and_the_docs_several_hosts_command_run_as_written(cluster, tmp_path):
    """docs/clusters.md's command with hostfile.example (node01 and node02, 4 slots each): 8 ranks,
    4 on each of two hosts; only the paths are this machine's."""
    section = (ROOT / "docs" / "clusters.md").read_text().split("## Several hosts")[1]
    line = next(line for line in section.splitlines() if line.startswith("mpirun --hostfile hostfile"))
    (tmp_path / "hostfile").write_text((ROOT / "hostfile.example").read_text())
    distml = str(Path(sys.executable).parent / "distml")
    command = [distml if word == "/path/to/.venv/bin/distml" else word for word in line.split()]

    done = cluster.exec(command, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                        env_extra={"PYTHONPATH": str(ROOT)})

    assert done.returncode == 0, done.stderr
    assert "distml: sync on 8 rank(s), digits" in done.stdout, done.stdout
    assert "done: sync, 8 rank(s), 3 epochs" in done.stdout, done.stdout


def test_no_packet_can_leave_the_namespaces(cluster):
    """No default route anywhere, and the root namespace has no link into the subnet."""
    for host in cluster.status["hosts"]:
        routes = emulated_cluster.sh("ip", "route", ns=host["namespace"]).stdout
        assert "default" not in routes and routes.strip() == "10.77.0.0/24 dev eth0 proto kernel scope link src " \
                                                             + host["address"]
    assert "10.77.0." not in emulated_cluster.sh("ip", "addr").stdout


MODES = {
    "sync": ("--epochs", 1),
    "async": ("--mode", "async", "--epochs", 1, "--staleness", 0, "--servers", -1),  # -1: all ranks but one
    "federated": ("--mode", "federated", "--clients", 5, "--clients-per-round", 4, "--rounds", 2,
                  "--local-steps", 3),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_weights_of_shared_memory_at_2_and_3_hosts(cluster, tmp_path, mode):
    for hosts in (2, 3):  # async: one worker (with two, the order the servers apply gradients in races)
        args = ("train", *SMALL, *(str(hosts - 1) if a == -1 else a for a in MODES[mode]))
        shm = launch(hosts, *args, "--save-model", tmp_path / f"shm{hosts}.pt", timeout=120)
        tcp = mpirun(cluster, hosts, *args, "--save-model", tmp_path / f"tcp{hosts}.pt")
        assert shm.returncode == 0, shm.stderr
        assert tcp.returncode == 0, tcp.stderr
        assert max_diff(tmp_path / f"shm{hosts}.pt", tmp_path / f"tcp{hosts}.pt") <= 1e-6


def test_a_preemption_signal_stops_every_host_and_the_resume_equals_the_uninterrupted_run(cluster, tmp_path):
    args = ("train", *SMALL, "--model", MODEL, "--epochs", 2, "--lr-schedule", "constant")
    full = mpirun(cluster, 3, *args, "--save-model", tmp_path / "full.pt")
    assert full.returncode == 0, full.stderr
    ckpt, mark = tmp_path / "ckpt", tmp_path / "mark"
    proc = start(cluster, 3, *args, "--checkpoint-dir", ckpt, "--save-model", tmp_path / "part.pt",
                 env={"DISTML_TEST_FAULT": "pause", "DISTML_TEST_FAULT_RANK": "2", "DISTML_TEST_FAULT_STEP": "35",
                      "DISTML_TEST_FAULT_MARK": str(mark)})
    _wait_for(mark, proc)
    os.kill(proc.pid, signal.SIGUSR1)  # to mpirun on node01, which forwards it to every host's rank
    out, err = proc.communicate(timeout=60)

    assert proc.returncode == 75, err
    assert sum("stopped by SIGUSR1" in line for line in err.splitlines()) == 1, err
    assert not (tmp_path / "part.pt").exists()
    resumed = mpirun(cluster, 3, *args, "--checkpoint-dir", ckpt, "--resume", "--save-model", tmp_path / "part.pt")
    assert resumed.returncode == 0, resumed.stderr
    assert max_diff(tmp_path / "full.pt", tmp_path / "part.pt") == 0.0


def _wait_for(mark, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not Path(mark).exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the fault's mark never appeared"
        time.sleep(0.05)


def _fault(rank, step, mark):
    return {"DISTML_TEST_FAULT": "pause", "DISTML_TEST_FAULT_RANK": str(rank), "DISTML_TEST_FAULT_STEP": str(step),
            "DISTML_TEST_FAULT_MARK": str(mark)}


def test_a_partition_is_named_by_the_hang_doctor_and_ends_the_job_with_124(cluster, tmp_path):
    """Traffic between node02 and node03 dropped while rank 2 pauses in a step: the next allreduce
    cannot finish on any rank; within --watchdog + 10 s of the cut the report names the two ranks
    that cannot reach each other, and the job exits 124. (Not the head's links: cut from node01,
    a host's daemon no longer hears mpirun, and Open MPI 5.0.11's mpirun waits for it after the
    abort: docs/hosts.md.)"""
    mark = tmp_path / "mark"
    proc = start(cluster, 3, "train", *SMALL, "--model", MODEL, "--epochs", 5, "--watchdog", 3,
                 env=_fault(2, 5, mark))
    _wait_for(mark, proc)
    cluster.partition("node02", "node03")
    cut = time.monotonic()
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - cut

    assert proc.returncode == 124, err
    assert took < 2 + 3 + 10, err  # the pause, the limit, and 10 s
    assert err.count("distml: watchdog: a rank has waited over 3 s") == 1, err
    assert "rank 1 cannot reach rank(s) 2 (no answer to a ping" in err, err
    assert "rank 2 cannot reach rank(s) 1 (no answer to a ping" in err, err
    assert "rank 0 cannot reach" not in err, err


def test_a_lost_rank_on_another_host_under_ulfm_ends_with_the_uninterrupted_weights(cluster, tmp_path):
    """Rank 2 (node03) killed at its 5th step: over TCP as on shared memory, the survivors redo
    the step and end where 1 rank x 48 ends."""
    common = ("--model", MODEL, "--epochs", 2, "--lr-schedule", "constant", "--threads", 1, "--quiet")
    done = mpirun(cluster, 3, "train", *common, "--batch-size", 16, "--on-rank-failure", "continue",
                  "--save-model", tmp_path / "lost.pt", "--metrics", tmp_path / "m.jsonl",
                  env={**_fault(2, 5, tmp_path / "mark"), "DISTML_TEST_FAULT": "kill"},
                  mpirun_args=("--with-ft", "ulfm"))

    assert done.returncode == 0, done.stderr
    assert done.stderr.count("distml: lost rank(s) 2 at epoch 1 step 5") == 1, done.stderr
    assert [r["rank"] for r in summary(tmp_path / "m.jsonl")["ranks_lost"]] == [2]
    reference = launch(0, "train", *common, "--batch-size", 48, "--save-model", tmp_path / "one.pt")
    assert reference.returncode == 0, reference.stderr
    assert max_diff(tmp_path / "lost.pt", tmp_path / "one.pt") < 1e-5


@pytest.mark.parametrize("mpirun_args", [(), ("--with-ft", "ulfm")], ids=["plain", "ulfm"])
def test_a_lost_host_ends_the_job_promptly_naming_the_host(cluster, tmp_path, mpirun_args):
    """Every process of node03 killed (its daemon and its rank: a node failure). Open MPI 5.0.11's
    runtime cannot go on without a daemon, also under ULFM: it names the host and ends the job at
    once, and nothing is saved. (It exits 0 then: measured, docs/hosts.md; PRRTE learnt to
    tolerate lost daemons after the runtime this Open MPI bundles.)"""
    mark = tmp_path / "mark"
    proc = start(cluster, 3, "train", *SMALL, "--model", MODEL, "--epochs", 5, "--save-model", tmp_path / "m.pt",
                 env=_fault(2, 5, mark), mpirun_args=mpirun_args)
    _wait_for(mark, proc)
    cluster.kill("node03")
    killed = time.monotonic()
    out, err = proc.communicate(timeout=60)

    assert time.monotonic() - killed < 10
    assert "PRTE has lost communication with a remote daemon" in err, err
    assert "Remote daemon: [" in err and "] on node node03" in err, err
    assert not (tmp_path / "m.pt").exists()


CONNECT_RTT = """
import socket, statistics, sys, time
times = []
for _ in range(7):
    s = socket.socket()
    start = time.perf_counter()
    try:
        s.connect((sys.argv[1], 9))  # refused: one round trip, SYN out and RST back
    except ConnectionRefusedError:
        times.append(time.perf_counter() - start)
    s.close()
print(statistics.median(times) * 1e3)
"""


def _round_trip_ms(cluster):
    done = cluster.exec([sys.executable, "-c", CONNECT_RTT, cluster.status["hosts"][1]["address"]],
                        capture_output=True, text=True, check=True)
    return float(done.stdout)


@pytest.mark.skipif(bool(emulated_cluster.why_no_delay()), reason=str(emulated_cluster.why_no_delay()))
def test_a_link_delay_adds_to_each_way_of_every_round_trip_until_reset(cluster):
    cluster.delay(3000)
    delayed = _round_trip_ms(cluster)
    cluster.reset()
    plain = _round_trip_ms(cluster)

    assert 6.0 <= delayed < 6.0 + 3.0, delayed  # 3 ms on node02's ingress, 3 ms on node01's
    assert plain < 1.0, plain


def test_down_leaves_nothing_after_a_failing_run(three_hosts):
    """Last in this file: it replaces the module's cluster (up clears an earlier one) and removes it."""
    delay = None if emulated_cluster.why_no_delay() else 1000
    with pytest.raises(subprocess.CalledProcessError):
        with emulated_cluster.Cluster(2, rate="100mbit", delay_us=delay) as cluster:
            cluster.exec(["sh", "-c", "exit 3"], check=True)
    assert emulated_cluster.leftovers() == []
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "distml-" not in left
    programs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "link_delay.py" not in programs
