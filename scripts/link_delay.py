"""Delay every packet a host receives by a fixed time: the link delay this kernel's missing netem
would give, from netfilter's packet queue.

    ip netns exec NS python scripts/link_delay.py --delay-us 1000 [--queue 0]
    ip netns exec NS iptables -t raw -A PREROUTING -i eth0 -j NFQUEUE --queue-num 0

The kernel hands each queued packet's id (not its bytes) to this program over a netfilter netlink
socket and holds the packet until a verdict. Every packet is delayed by the same time, so packets
leave the queue in arrival order, and one batch verdict ("accept every id up to N") releases all
whose time has come: one system call per release, not per packet. Delay is added on the receiver,
not on the sender's egress: there held packets would count against the sending socket's buffer
and collapse TCP's throughput. Run on every host, each direction of a link gets the delay once.

The protocol (linux/netfilter/nfnetlink_queue.h) is spoken directly: libnetfilter_queue is a C
library, and its Python binding ships no wheel. Prints "ready" once bound; runs until killed.
"""
import argparse
import collections
import os
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER, SOL_NETLINK, NETLINK_NO_ENOBUFS = 12, 270, 5
NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 1, 4, 2
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_COPY_META, NFQA_CFG_F_GSO = 1, 1, 1 << 2
NF_ACCEPT = 1
QUEUE_MAXLEN = 1 << 16  # packets held at once; 1 Gbit/s for 100 ms is ~8,300 full-size ones
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port


def attribute(kind, payload):
    pad = -len(payload) % 4
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * pad


def message(kind, queue, attributes, flags=NLM_F_REQUEST):
    """An nfnetlink message to the queue subsystem: nlmsghdr, nfgenmsg, attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attributes)
    return HEADER.pack(HEADER.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body


def configure(sock, queue):
    """Bind the queue, ask for packet ids only (no payload), let GSO packets through whole (fewer
    to handle), and a long queue; each step acknowledged or raised."""
    steps = [[attribute(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, 0))],
             [attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))],
             [attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))],
             [attribute(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO)),
              attribute(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO))]]
    for attrs in steps:
        sock.send(message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
        reply = sock.recv(4096)
        _, kind, _, _, _ = HEADER.unpack_from(reply)
        error = struct.unpack_from("=i", reply, HEADER.size)[0] if kind == NLMSG_ERROR else 0
        if error:
            raise OSError(-error, f"nfnetlink_queue configuration refused: {os.strerror(-error)}")


def last_packet_id(data, size):
    """The id of the last queued packet in one datagram (ids grow by one per packet)."""
    last, offset = None, 0
    while offset + HEADER.size <= size:
        length, kind, _, _, _ = HEADER.unpack_from(data, offset)
        if length < HEADER.size:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            at = offset + HEADER.size + 4  # past nfgenmsg: the first attribute is the packet header
            if struct.unpack_from("=H", data, at + 2)[0] == NFQA_PACKET_HDR:
                last = struct.unpack_from("!I", data, at + 4)[0]
        offset += (length + 3) & ~3
    return last


def receive(sock, buffer, held, delay_s, most=256):
    """Take up to `most` waiting packets, each due delay_s after it was read (packets read within
    50 µs of each other share one entry); stop early once the oldest held packet is due."""
    for _ in range(most):
        try:
            size = sock.recv_into(buffer, len(buffer), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        found = last_packet_id(buffer, size)
        if found is None:
            continue
        due = time.monotonic() + delay_s
        if held and due - held[-1][0] < 50e-6:
            held[-1] = (held[-1][0], found)
        else:
            held.append((due, found))
        if held[0][0] <= time.monotonic():
            return


def run(delay_s, queue):
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: room for a burst of ids
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    configure(sock, queue)
    print("ready", flush=True)
    held = collections.deque()  # (release time, last id received by then), in arrival order
    buffer = bytearray(1 << 16)
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        if select.select([sock], [], [], timeout)[0]:
            receive(sock, buffer, held, delay_s)
        now, release = time.monotonic(), None
        while held and held[0][0] <= now:
            release = held.popleft()[1]
        if release is not None:
            verdict = attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, release))
            sock.send(message(NFQNL_MSG_VERDICT_BATCH, queue, [verdict]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-us", type=int, required=True, help="added to every received packet")
    parser.add_argument("--queue", type=int, default=0, help="the NFQUEUE number (default 0)")
    args = parser.parse_args(argv)
    if args.delay_us < 0 or not 0 <= args.queue < 65536:
        parser.error("--delay-us must be >= 0 and --queue 0-65535")
    try:
        run(args.delay_us / 1e6, args.queue)
    except KeyboardInterrupt:
        return 0
    except OSError as error:
        print(f"link_delay: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
