"""Secure aggregation of a federated round over MPI: the messaging around `distml.secagg`.

Each rank plays the clients it trains this round (and the ones that will drop);
root also plays the server's part of adding noise. Four collectives a round:

    Allreduce   the clients' X25519 public keys (each row filled by one rank)
    Alltoallv   each client's Shamir shares to the ranks of its neighbours
    Allreduce   the masked fixed-point updates, summed mod 2**64: the round's sum
    Allgatherv  the surviving neighbours' shares: self-mask seeds of survivors,
                private keys of dropped clients (never both for one client)

Every rank then removes the masks the same way and decodes the same sum. A
rank sees the raw updates of the clients it simulates (as a real client sees
its own), other ranks only the masked sum; see docs/privacy.md for the threat
model.
"""
from collections import Counter

import numpy as np
import torch

from .. import secagg

__all__ = ["secure_sum", "SHARE_BYTES"]

SHARE_BYTES = 4 + (521 + 7) // 8  # secagg's share: x (4 bytes) and y mod 2**521 - 1
_ID = 4  # a client number in a message, int32 big-endian


def secure_sum(comm, contributions, dim, sampled, survivors, dealt, *, k, seed, round_, extra=None):
    """(The float64 sum over `survivors` of their `dim`-vectors, what this rank put into the Allreduce).

    `contributions`: this rank's surviving clients -> vector. `dealt`: the rank that plays each
    sampled client. `extra`: a vector root adds once (the noise). Raises secagg.TooFewSurvivors,
    alike on every rank, when the masks cannot be removed.
    """
    _check_round(comm.size, sampled, survivors, dealt)
    graph = secagg.neighbors(sampled, k, seed, round_)
    t = thresholds(graph, dealt)
    mine = [c for c in sampled if dealt[c] == comm.rank]
    keys = {c: secagg.ClientSecrets.generate() for c in mine}
    publics = _exchange_publics(comm, sampled, keys)
    held = _deliver_shares(comm, graph, dealt, keys, t)
    bound = len(sampled) + 1  # the fixed-point range leaves room for every client and root's extra
    total = np.zeros(dim, dtype=np.uint64)
    for c in mine:
        if c in contributions:
            neighbours = {j: publics[j] for j in graph[c]}
            total += secagg.mask(secagg.encode(contributions[c], bound), c, keys[c], neighbours, round_)
    if extra is not None and comm.is_root:
        total += secagg.encode(extra, bound)
    summed = torch.from_numpy(total.copy())
    comm.allreduce_(summed, what="the round's masked updates")
    alive = set(survivors)
    revealed = _reveal(comm, held, alive)
    self_seeds = {s: secagg.recover(s, revealed.get(s, []), graph, t[s]) for s in survivors}
    dropped = [c for c in sampled if c not in alive]
    dropped_keys = {d: secagg.recover(d, revealed.get(d, []), graph, t[d]) for d in dropped}
    unmasked = secagg.unmask(summed.numpy(), survivors, dropped, graph, publics, self_seeds, dropped_keys, round_)
    return secagg.decode(unmasked), total


def _check_round(size, sampled, survivors, dealt):
    """TooFewSurvivors (alike on every rank) for a round whose sum would give a client away: fewer
    than 3 clients, or a rank left with one other rank's client once it takes its own away."""
    if len(sampled) < 3:
        raise secagg.TooFewSurvivors(f"{len(sampled)} client(s) sampled, it needs 3")
    for rank in range(size):
        others = [c for c in survivors if dealt[c] != rank]
        if len(others) == 1:
            raise secagg.TooFewSurvivors(f"rank {rank} would learn client {others[0]}'s update, the only "
                                         f"surviving client of the other ranks")


def thresholds(graph, dealt):
    """Each client's Shamir threshold: a majority of its neighbours, and more shares than any one
    other rank holds of it. A rank plays many clients, so the shares it holds are one party's:
    with t of them it alone could rebuild the client's secrets. TooFewSurvivors (alike on every
    rank) where no threshold can be met: then that rank plays too many of the client's neighbours."""
    t = {}
    for c, neighbours in graph.items():
        held = Counter(dealt[j] for j in neighbours if dealt[j] != dealt[c])
        rank, most = held.most_common(1)[0] if held else (None, 0)
        t[c] = max(secagg.threshold(len(neighbours)), most + 1)
        if t[c] > len(neighbours):
            raise secagg.TooFewSurvivors(f"client {c}: rank {rank} plays {most} of its {len(neighbours)} neighbours "
                                         f"and could rebuild its mask alone")
    return t


def _exchange_publics(comm, sampled, keys):
    rows = torch.zeros(len(sampled), 32, dtype=torch.uint8)
    for i, c in enumerate(sampled):
        if c in keys:
            rows[i] = torch.frombuffer(bytearray(keys[c].public), dtype=torch.uint8)
    comm.allreduce_(rows, what="the clients' public keys")  # one rank fills each row: the sum is that row
    return {c: bytes(rows[i].numpy()) for i, c in enumerate(sampled)}


def _deliver_shares(comm, graph, dealt, keys, t):
    """Send each client's shares (key, self seed) to its neighbours' ranks; returns (client, holder) -> pair."""
    outgoing = [[] for _ in range(comm.size)]
    for c, secrets_ in keys.items():
        n = len(graph[c])
        key_shares = secagg.split(secrets_.private_bytes(), n, t[c])
        seed_shares = secagg.split(secrets_.self_seed, n, t[c])
        for j, key_share, seed_share in zip(graph[c], key_shares, seed_shares):
            outgoing[dealt[j]].append(_ids(c, j) + key_share + seed_share)
    record = 2 * _ID + 2 * SHARE_BYTES
    received = _alltoallv(comm, [b"".join(parts) for parts in outgoing])
    held = {}
    for start in range(0, len(received), record):
        c, j = _read_ids(received[start:start + 2 * _ID])
        body = received[start + 2 * _ID:start + record]
        held[c, j] = (body[:SHARE_BYTES], body[SHARE_BYTES:])
    return held


def _reveal(comm, held, alive):
    """Every rank learns the shares surviving holders hand in: client -> [share, ...]."""
    mine = b"".join(_ids(c, j) + pair[0 if c not in alive else 1] for (c, j), pair in sorted(held.items())
                    if j in alive)
    everything = _allgatherv(comm, mine)
    record = 2 * _ID + SHARE_BYTES
    revealed = {}
    for start in range(0, len(everything), record):
        c, _ = _read_ids(everything[start:start + 2 * _ID])
        revealed.setdefault(c, []).append(everything[start + 2 * _ID:start + record])
    return revealed


def _ids(c, j):
    return int(c).to_bytes(_ID, "big") + int(j).to_bytes(_ID, "big")


def _read_ids(raw):
    return int.from_bytes(raw[:_ID], "big"), int.from_bytes(raw[_ID:], "big")


def _alltoallv(comm, parts):
    """parts[r] (bytes) to rank r; returns what every rank sent here, in rank order."""
    send_counts = torch.tensor([len(p) for p in parts], dtype=torch.int64)
    recv_counts = comm.alltoall_(send_counts, torch.zeros_like(send_counts))
    send = torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8) if any(parts) else torch.zeros(0, dtype=torch.uint8)
    out = torch.zeros(int(recv_counts.sum()), dtype=torch.uint8)
    comm.wait(comm.ialltoallv(send, send_counts.tolist(), out, recv_counts.tolist()), what="the mask shares")
    return bytes(out.numpy())


def _allgatherv(comm, mine):
    """Every rank's bytes `mine`, concatenated in rank order, on every rank."""
    count = torch.tensor([len(mine)], dtype=torch.int64)
    counts = comm.allgather_(count, torch.zeros(comm.size, dtype=torch.int64))
    send = torch.frombuffer(bytearray(mine), dtype=torch.uint8) if mine else torch.zeros(0, dtype=torch.uint8)
    out = torch.zeros(int(counts.sum()), dtype=torch.uint8)
    comm.wait(comm.iallgatherv(send, out, counts.tolist()), what="the revealed shares")
    return bytes(out.numpy())
