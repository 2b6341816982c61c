"""Several hosts on one machine: network namespaces joined by a switch, MPI over TCP between them.

    python scripts/emulated_cluster.py up N [--rate 100mbit] [--delay-us 1000]
    python scripts/emulated_cluster.py status
    python scripts/emulated_cluster.py exec -- mpirun -n 3 --hostfile '$DISTML_HOSTFILE' distml train ...
    python scripts/emulated_cluster.py partition node02 node03   # drop traffic between two hosts
    python scripts/emulated_cluster.py heal                      # undo partitions
    python scripts/emulated_cluster.py kill node03               # every process of a host: a node failure
    python scripts/emulated_cluster.py down

Root only (it makes namespaces). Host i (from 0) is namespace `distml-nodeNN` with hostname
`nodeNN` (NN = i + 1 in two digits, the names in hostfile.example) and address 10.77.0.<10+i>/24
on its `eth0`; the other end of each link is a port of a bridge in namespace `distml-switch`.
Nothing joins the root namespace and no namespace has a route out, so no packet leaves them
whatever the addresses. `exec` runs a command on the head, node01, with Open MPI told to use TCP
on that subnet, to launch remote daemons through `ip netns exec` (an agent script instead of
ssh; each host gets its own hostname, as one shared name hangs mpirun), not to bind ranks to
cores (each "host" would bind its rank to core 0), and `DISTML_HOSTFILE` naming a hostfile with
one slot per host.

Links are shaped on each host's egress with the kernel's tbf qdisc (--rate). Delay (--delay-us, each
way) is added on each host's ingress by scripts/link_delay.py holding the packets that an iptables
NFQUEUE rule queues: this kernel has no netem qdisc, and delaying on the sender's egress collapses
TCP's throughput. Without it the links keep veth's own latency, measured by scripts/bench_hosts.py.

Everything `up` makes (namespaces, links, qdiscs, iptables rules, blackhole routes, the files under
/etc/netns and the state directory, processes in the namespaces) carries our names and goes with `down`, also
when `up` fails or is interrupted; `up` first clears whatever a killed earlier run left.
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Cluster", "Unavailable", "leftovers"]

PREFIX = "distml-"
SWITCH = PREFIX + "switch"
SUBNET = "10.77.0"
STATE = Path("/run/distml-emulated-cluster")  # status, the hostfile and the launch agent
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` mounts /etc/netns/NS/hosts over /etc/hosts
VENV_BIN = Path(sys.executable).parent
LINK_DELAY = Path(__file__).resolve().parent / "link_delay.py"


class Unavailable(Exception):
    """No emulated cluster can be made here; the message says why (tests are skipped with it)."""


def sh(*args, check=True, timeout=30, ns=None, **kwargs):
    """Run a command (in namespace `ns`), output captured; a failure raises with its stderr."""
    command = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode:
        raise RuntimeError(f"`{shlex.join(command)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def host_name(i):
    return f"node{i + 1:02d}"  # hostfile.example's names


def address(i):
    return f"{SUBNET}.{10 + i}"


def why_unavailable():
    """None if namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "needs iproute2's `ip` and util-linux's `unshare`"
    probe = PREFIX + "probe"
    done = sh("ip", "netns", "add", probe, check=False)
    sh("ip", "netns", "del", probe, check=False)
    if done.returncode:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    return None


def our_namespaces():
    out = sh("ip", "netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in out if line.startswith(PREFIX)]


def leftovers():
    """What an emulated cluster left behind: our namespaces, /etc/netns entries and state (empty when clean)."""
    files = [str(p) for p in NETNS_ETC.glob(PREFIX + "*")] if NETNS_ETC.exists() else []
    return our_namespaces() + files + ([str(STATE)] if STATE.exists() else [])


def down():
    """Remove everything an emulated cluster made (ours only: names starting with `distml-`)."""
    for ns in our_namespaces():
        _kill_in(ns)
        sh("ip", "netns", "del", ns, check=False)
    for path in NETNS_ETC.glob(PREFIX + "*") if NETNS_ETC.exists() else []:
        shutil.rmtree(path, ignore_errors=True)
    if (STATE / "made-etc-netns").exists() and NETNS_ETC.exists() and not any(NETNS_ETC.iterdir()):
        NETNS_ETC.rmdir()  # only if `up` made it
    shutil.rmtree(STATE, ignore_errors=True)


def up(n, rate=None, delay_us=None):
    """Make n hosts and the switch; returns the status. On any failure or interrupt, removes it all."""
    if not 1 <= n <= 200:
        raise ValueError(f"hosts must be 1 to 200, got {n}")
    if delay_us is not None and not 0 < delay_us <= 10_000_000:
        raise ValueError(f"--delay-us must be 1 to 10000000, got {delay_us}")
    reason = why_unavailable() or (why_no_delay() if delay_us else None)
    if reason:
        raise Unavailable(reason)
    down()  # what a killed earlier run left
    try:
        return _build(n, rate, delay_us)
    except BaseException:
        down()
        raise


def _build(n, rate, delay_us):
    STATE.mkdir(parents=True)
    if not NETNS_ETC.exists():
        (STATE / "made-etc-netns").touch()
    sh("ip", "netns", "add", SWITCH)
    sh("ip", "link", "add", "br0", "type", "bridge", ns=SWITCH)
    sh("ip", "link", "set", "br0", "up", ns=SWITCH)
    hosts = "127.0.0.1 localhost\n" + "".join(f"{address(i)} {host_name(i)}\n" for i in range(n))
    for i in range(n):
        ns = PREFIX + host_name(i)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"port{i}", "netns", SWITCH)
        sh("ip", "link", "set", f"port{i}", "master", "br0", "up", ns=SWITCH)
        sh("ip", "addr", "add", f"{address(i)}/24", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        if rate:
            sh("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "256kbit",
               "latency", "200ms", ns=ns)
        (NETNS_ETC / ns).mkdir(parents=True)
        (NETNS_ETC / ns / "hosts").write_text(hosts)
    agent = STATE / "agent"
    agent.write_text(AGENT.format(prefix=PREFIX))
    agent.chmod(0o755)
    (STATE / "hostfile").write_text("".join(f"{host_name(i)} slots=1\n" for i in range(n)))
    status = {"hosts": [{"name": host_name(i), "namespace": PREFIX + host_name(i), "address": address(i)}
                        for i in range(n)],
              "head": PREFIX + host_name(0), "hostfile": str(STATE / "hostfile"), "agent": str(agent),
              "rate": rate, "delay_us": delay_us}
    (STATE / "status.json").write_text(json.dumps(status, indent=1))
    set_delay(status, delay_us)
    _wait_reachable(status)
    return status


# PRRTE calls its launch agent as `AGENT HOST "<command>"` (no ssh options): the command runs in
# HOST's namespace under HOST's hostname, with the caller's environment. The agent itself stays in
# the caller's namespace, as ssh stays on the caller's host: when every process of HOST is killed
# (a node failure), it exits 255, as ssh does when the remote end dies (PRRTE reads the status), a
# second later: had it exited first, mpirun would end the job without naming the host.
AGENT = """#!/bin/sh
host="$1"; shift
ip netns exec "{prefix}$host" unshare --uts sh -c "hostname $host && exec sh -c \\"\\$0\\"" "$*"
status=$?
[ $status -gt 128 ] && sleep 1 && exit 255  # ssh notices a dead host after its connection does
exit $status
"""


def set_delay(status, delay_us):
    """Every packet a host receives is held delay_us (None: not held), replacing any earlier delay:
    scripts/link_delay.py on each host, bound to netfilter queue 0 before the rule feeding it exists."""
    for host in status["hosts"]:
        ns = host["namespace"]
        pid = STATE / f"delay-{ns}.pid"
        if pid.exists():  # an earlier delay: its rule first (no packet queued for a dead program), then it
            sh("iptables", "-t", "raw", "-F", "PREROUTING", ns=ns)
            _kill_link_delay(int(pid.read_text()))
            pid.unlink()
        if delay_us:
            _start_delay(ns, delay_us, pid)
            sh("iptables", "-t", "raw", "-A", "PREROUTING", "-i", "eth0", "-j", "NFQUEUE", "--queue-num", "0",
               ns=ns)


def why_no_delay():
    """None if --delay-us can work here, else the reason."""
    if not shutil.which("iptables"):
        return "a link delay needs iptables (apt-get install iptables)"
    if not Path("/proc/net/netfilter/nfnetlink_queue").exists():
        return "a link delay needs the kernel's nfnetlink_queue (modprobe nfnetlink_queue)"
    return None


def _kill_link_delay(pid):
    """SIGKILL pid if it still is a link_delay.py (a reaped one's pid may have been reused)."""
    try:
        if b"link_delay.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
            _kill(pid)
    except OSError:
        pass


def _start_delay(ns, delay_us, pid, timeout=10):
    log = STATE / f"delay-{ns}.log"
    with open(log, "w") as out:  # `ip netns exec` execs: its pid is the program's
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, LINK_DELAY, "--delay-us", str(delay_us)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pid.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while "ready" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"link_delay did not start in {ns}: {log.read_text().strip() or 'no output'}")
        time.sleep(0.05)


def _wait_reachable(status, timeout=10):
    """Every host answers the head (a TCP connect to a closed port is refused: the host is there;
    no ping is needed). The bridge learns its ports in a moment."""
    probe = ("import socket, sys\n"
             "for a in sys.argv[1:]:\n"
             "    s = socket.socket(); s.settimeout(1)\n"
             "    try: s.connect((a, 9))\n"
             "    except ConnectionRefusedError: pass\n"
             "    except OSError as e: sys.exit(f'{a}: {e}')\n")
    deadline = time.monotonic() + timeout
    while True:
        done = sh(sys.executable, "-c", probe, *[h["address"] for h in status["hosts"][1:]], ns=status["head"],
                  check=False)
        if not done.returncode:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"a host does not answer the head: {done.stderr.strip()}")
        time.sleep(0.1)


def status():
    """The running cluster's status (hosts, head, hostfile), or None."""
    path = STATE / "status.json"
    return json.loads(path.read_text()) if path.exists() else None


def environment(status):
    """What `exec` adds to the environment: Open MPI over TCP on our subnet, our launcher, no binding,
    and each host's share of the cores as OMP_NUM_THREADS (unless set)."""
    net = f"{SUBNET}.0/24"
    return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "PRTE_MCA_plm_ssh_agent": status["agent"], "PRTE_MCA_oob_tcp_if_include": net,
            "OMPI_MCA_btl": "tcp,self", "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl_tcp_if_include": net,
            "PRTE_MCA_hwloc_default_binding_policy": "none",
            # by slot, one a host: `:oversubscribe` (which `make test` exports) maps by core and ignores
            # the hostfile's slots, starting every rank on the head
            "PRTE_MCA_rmaps_default_mapping_policy": "slot", "OMPI_MCA_rmaps_base_oversubscribe": "0",
            # the machine's cores shared out over the hosts: distml (and OpenMP) would otherwise take
            # every core of the machine as its host's (3 hosts x 2 threads on 2 cores: distml compare 6-12x slower)
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")
            or str(max(1, len(os.sched_getaffinity(0)) // len(status["hosts"]))),
            "DISTML_HOSTFILE": status["hostfile"],
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}


def on_head(command, status, env_extra=None):
    """(argv, env) running `command` (a list; '$DISTML_HOSTFILE' in an argument is expanded) on the head."""
    env = {**os.environ, **environment(status), **(env_extra or {})}
    command = [str(arg).replace("$DISTML_HOSTFILE", env["DISTML_HOSTFILE"]) for arg in command]
    inner = f"hostname {status['hosts'][0]['name']} && exec \"$@\""
    return ["ip", "netns", "exec", status["head"], "unshare", "--uts", "sh", "-c", inner, "sh", *command], env


def exec_on_head(command, status, *, env_extra=None, **kwargs):
    """subprocess.run of `command` on the head node (kwargs: run's, such as timeout and capture_output)."""
    argv, env = on_head(command, status, env_extra)
    return subprocess.run(argv, env=env, **kwargs)


def partition(status, a, b):
    """Drop every packet between hosts a and b (names), both ways, from now on: a blackhole route
    for the other's address on each (silent, as a broken link: no error reaches the sender; this
    kernel's tc has no drop action)."""
    hosts = {h["name"]: h for h in status["hosts"]}
    for me, other in ((a, b), (b, a)):
        sh("ip", "route", "add", "blackhole", f"{hosts[other]['address']}/32", ns=hosts[me]["namespace"])


def heal(status):
    """Undo every partition."""
    for host in status["hosts"]:
        sh("ip", "route", "flush", "type", "blackhole", ns=host["namespace"], check=False)


def kill_host(status, name):
    """SIGKILL every process of host `name` (its namespace): what a node failure looks like to MPI.
    With a link delay, its program goes too, and the host's queued packets are dropped."""
    ns = next(h["namespace"] for h in status["hosts"] if h["name"] == name)
    return _kill_in(ns)


def _kill_in(ns):
    pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
    for pid in pids:
        _kill(pid)
    return pids


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Cluster:
    """`with Cluster(3, rate="100mbit") as c: c.exec([...])`: up on entry, down on exit (also on errors)."""

    def __init__(self, n, rate=None, delay_us=None):
        self.n, self.rate, self.delay_us, self.status = n, rate, delay_us, None

    def __enter__(self):
        self.status = up(self.n, self.rate, self.delay_us)
        return self

    def __exit__(self, *exc):
        down()

    def exec(self, command, *, env_extra=None, **kwargs):
        """subprocess.run of `command` on the head node."""
        return exec_on_head(command, self.status, env_extra=env_extra, **kwargs)

    def start(self, command, *, env_extra=None):
        """A running `command` on the head (text pipes), in a session of its own."""
        argv, env = on_head(command, self.status, env_extra)
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def partition(self, a, b):
        partition(self.status, a, b)

    def kill(self, name):
        return kill_host(self.status, name)

    def reset(self):
        """Links whole again, with up's delay, and no process left on any host (between tests)."""
        heal(self.status)
        set_delay(self.status, None)
        for host in self.status["hosts"]:
            _kill_in(host["namespace"])
        set_delay(self.status, self.status.get("delay_us"))

    def delay(self, delay_us):
        """Hold every received packet delay_us from now on (until reset)."""
        set_delay(self.status, delay_us)


def _run_forwarding_signals(argv, env):
    """Run argv; SIGINT or SIGTERM to this process goes on to it (mpirun passes it to every host's
    ranks), and this waits for it to end, so no daemon is left running on a host."""
    proc = subprocess.Popen(argv, env=env)
    forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    return proc.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    make = sub.add_parser("up", help="make N hosts (clearing any earlier cluster)")
    make.add_argument("n", type=int)
    make.add_argument("--rate", help="each host's egress rate, in tc's units (1gbit, 100mbit)")
    make.add_argument("--delay-us", type=int, help="delay added to every packet, each way, in microseconds")
    sub.add_parser("status", help="the running cluster, as JSON")
    run = sub.add_parser("exec", help="run a command on the head node (after --)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    cut = sub.add_parser("partition", help="drop all traffic between two hosts")
    cut.add_argument("a")
    cut.add_argument("b")
    sub.add_parser("heal", help="undo every partition")
    kill = sub.add_parser("kill", help="SIGKILL every process of one host")
    kill.add_argument("host")
    sub.add_parser("down", help="remove everything the cluster made")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds `up` through its cleanup
    if args.action == "up":
        try:
            print(json.dumps(up(args.n, args.rate, args.delay_us), indent=1))
        except (Unavailable, ValueError) as e:
            print(f"emulated_cluster: {e}", file=sys.stderr)
            return 2
        return 0
    if args.action == "down":
        down()
        return 0
    current = status()
    if current is None:
        print("emulated_cluster: no cluster is up (run `up N` first)", file=sys.stderr)
        return 2
    if args.action == "status":
        print(json.dumps(current, indent=1))
    elif args.action == "exec":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            print("emulated_cluster: exec needs a command after --", file=sys.stderr)
            return 2
        return _run_forwarding_signals(*on_head(command, current))
    elif args.action == "partition":
        partition(current, args.a, args.b)
    elif args.action == "heal":
        heal(current)
    elif args.action == "kill":
        print(" ".join(map(str, kill_host(current, args.host))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
