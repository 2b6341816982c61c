"""Secure aggregation's building blocks, without any messaging (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

The server learns the sum of the surviving clients' updates and nothing else:
each client adds to its fixed-point update a self mask and, for each neighbour
in a public k-regular graph, a pairwise mask that the neighbour subtracts, so
the pairwise masks cancel in the sum. Clients that drop after masking leave
their neighbours' pairwise masks uncancelled; the survivors then hand in
Shamir shares of the dropped clients' private keys (to recompute those masks)
and of their own self-mask seeds (to remove them), never both for one client,
or the server could unmask that client's vector alone.

One round as the caller runs it (the messaging is the caller's; `simulate`
runs the same steps in one process):

    graph = neighbors(clients, default_neighbors(len(clients), dropout), seed, round_)
    mine = ClientSecrets.generate()                                  # publish mine.public
    t = threshold(len(graph[i]))
    key_shares = split(mine.private_bytes(), len(graph[i]), t)       # one each to graph[i], in order
    seed_shares = split(mine.self_seed, len(graph[i]), t)
    masked = mask(encode(update, len(clients)), i, mine, {j: publics[j] for j in graph[i]}, round_)
    total = sum of masked vectors mod 2**64                          # uint64 wraps
    self_seeds[s] = recover(s, seed shares held by s's surviving neighbours, graph)
    dropped_keys[d] = recover(d, key shares held by d's surviving neighbours, graph)
    update_sum = decode(unmask(total, survivors, dropped, graph, publics, self_seeds, dropped_keys, round_))

Masks come from ChaCha20 keystreams, never numpy's generator, whose output
reveals its state; the numpy generator shuffles only the public graph.
"""
import math
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["FRACTION_BITS", "PRIME", "TooFewSurvivors", "ClientSecrets", "value_range", "encode", "decode",
           "prg", "pair_seed", "mask", "split", "combine", "threshold", "neighbors", "default_neighbors",
           "recover", "unmask", "simulate"]

FRACTION_BITS = 32
PRIME = 2**521 - 1  # a Mersenne prime: wider than any 32-byte secret, so a secret is one field element
SECRET_BYTES = 32
_X_BYTES, _Y_BYTES = 4, (521 + 7) // 8
_NONCE = bytes(16)
_SYSTEM_RANDOM = secrets.SystemRandom()


class TooFewSurvivors(ValueError):
    """Fewer of a client's neighbours survived than the Shamir threshold: its mask cannot be removed."""


# --- fixed point ---------------------------------------------------------------------------------

def value_range(count_bound):
    """The largest |coordinate| a client may send so that a sum over `count_bound` clients stays within int64."""
    return 2 ** (63 - FRACTION_BITS) / count_bound


def _fixed_limit(count_bound):
    """The largest float, in fixed-point units, that `count_bound` copies of sum to at most 2**63 - 1."""
    limit = (2**63 - 1) // count_bound
    as_float = float(limit)
    return as_float if int(as_float) <= limit else math.nextafter(as_float, 0.0)


def encode(x, count_bound):
    """x (floats) -> uint64 fixed point with FRACTION_BITS fractional bits, two's complement mod 2**64.

    Each coordinate is clipped to +-value_range(count_bound), so the sum of up to
    `count_bound` encodings (mod 2**64) decodes to the float sum within
    count_bound * 2**-(FRACTION_BITS + 1). NaN is refused: once masked, nobody
    could tell which client sent it.
    """
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("encode: the update has NaN coordinates; secure aggregation would hide which client sent them")
    limit = _fixed_limit(count_bound)
    fixed = np.clip(np.rint(x * 2.0**FRACTION_BITS), -limit, limit)
    return fixed.astype(np.int64).view(np.uint64)


def decode(total):
    """A uint64 fixed-point sum -> float64: read as int64 (two's complement), divide by 2**FRACTION_BITS."""
    return np.ascontiguousarray(total, dtype=np.uint64).view(np.int64) / 2.0**FRACTION_BITS


# --- masks ---------------------------------------------------------------------------------------

def prg(seed, n):
    """n uint64 words of ChaCha20 keystream keyed by the 32-byte `seed`.

    The nonce is fixed (zeros) because each seed keys one stream only: self seeds
    are fresh every round and pair seeds bind the round, so no two vectors are
    ever masked with the same keystream. Mask a round's whole update as one vector.
    """
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    words = np.empty(n, dtype="<u8")  # little-endian on every host, so both ends of a pair agree
    encryptor.update_into(bytes(8 * n), words.view(np.uint8))  # straight into the array: twice as fast as a copy
    return words.astype(np.uint64, copy=False)


def pair_seed(private_key, peer_public, round_, a, b):
    """The seed that clients a and b share this round: X25519 agreement, then HKDF-SHA256.

    The info binds the round and the unordered pair, so both ends derive the same
    seed and a seed never repeats across rounds even though the keys might.
    """
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = b"distml secagg pair" + b"".join(v.to_bytes(8, "big") for v in (round_, min(a, b), max(a, b)))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


@dataclass(frozen=True)
class ClientSecrets:
    """One client's secrets for one round: its X25519 key pair and its self-mask seed."""
    private_key: X25519PrivateKey
    public: bytes
    self_seed: bytes | None

    @classmethod
    def generate(cls):
        """Fresh secrets for a round (both from the OS's random source)."""
        key = X25519PrivateKey.generate()
        return cls(key, key.public_key().public_bytes_raw(), secrets.token_bytes(32))

    @classmethod
    def from_private_bytes(cls, raw):
        """A dropped client's key, rebuilt from shares. Its self seed stays None: a client's key
        and self seed are never both reconstructed, or its own masked vector would be exposed."""
        key = X25519PrivateKey.from_private_bytes(raw)
        return cls(key, key.public_key().public_bytes_raw(), None)

    def private_bytes(self):
        """The raw 32-byte private key, the secret that is Shamir-split among the neighbours."""
        return self.private_key.private_bytes_raw()


def mask(encoded, client, secrets, neighbor_publics, round_):
    """encoded + prg(self seed) + sum over neighbours j of +-prg(pair seed), mod 2**64.

    The pairwise mask is added by the lower-numbered client of a pair and
    subtracted by the higher, so it cancels when both vectors are summed.
    """
    n = len(encoded)
    masked = np.asarray(encoded, dtype=np.uint64) + prg(secrets.self_seed, n)
    for j, public in neighbor_publics.items():
        words = prg(pair_seed(secrets.private_key, public, round_, client, j), n)
        if client < j:
            masked += words
        else:
            masked -= words
    return masked


# --- Shamir secret sharing over GF(PRIME) ---------------------------------------------------------

def split(secret, n, t, *, rng=_SYSTEM_RANDOM):
    """n shares of a 32-byte secret, any t of which recover it and any t-1 of which say nothing.

    Share i is the point (i, f(i)) of a random polynomial of degree t-1 with
    f(0) = secret, as x (4 bytes) then y (66 bytes), big-endian: fixed length.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"split: the secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= t <= n < 2 ** (8 * _X_BYTES):
        raise ValueError(f"split: need 1 <= t <= n, got t={t}, n={n}")
    coefficients = [int.from_bytes(secret, "big")] + [rng.randrange(PRIME) for _ in range(t - 1)]
    return [x.to_bytes(_X_BYTES, "big") + _evaluate(coefficients, x).to_bytes(_Y_BYTES, "big")
            for x in range(1, n + 1)]


def _evaluate(coefficients, x):
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


def _interpolate_at_zero(points):
    total = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def _parse(share):
    if len(share) != _X_BYTES + _Y_BYTES:
        raise ValueError(f"combine: a share is {_X_BYTES + _Y_BYTES} bytes, got {len(share)}")
    return int.from_bytes(share[:_X_BYTES], "big"), int.from_bytes(share[_X_BYTES:], "big")


def combine(shares):
    """The 32-byte secret from at least t shares of it (Lagrange interpolation at 0).

    Fewer than t shares (or a corrupted one) give a field element that is almost
    surely wider than 32 bytes (the chance it is not is 2**-265): ValueError.
    """
    points = [_parse(s) for s in shares]
    if len({x for x, _ in points}) != len(points):
        raise ValueError("combine: two shares have the same x; pass each neighbour's share once")
    value = _interpolate_at_zero(points)
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ValueError(f"combine: {len(shares)} shares do not give a {SECRET_BYTES}-byte secret; "
                         "fewer than the threshold, or a corrupted share")
    return value.to_bytes(SECRET_BYTES, "big")


def threshold(num_neighbors):
    """Shares needed to recover a client's secrets: a strict majority of its neighbours.

    An honest neighbour hands in one kind of share per client: its key's if it
    dropped, its self seed's if it survived. With a majority, a server that tells
    some neighbours one story and the rest the other cannot collect t of both.
    """
    return num_neighbors // 2 + 1


def recover(client, shares, graph, t=None):
    """`client`'s secret from the shares its surviving neighbours hold, or TooFewSurvivors.

    `t`: the threshold its shares were split with (default: threshold(degree)).
    """
    degree = len(graph[client])
    t = t or threshold(degree)
    if len(shares) < t:
        raise TooFewSurvivors(f"client {client}: {len(shares)} of its {degree} neighbours survived, "
                              f"the threshold is {t}")
    return combine(shares)


# --- the neighbour graph --------------------------------------------------------------------------

def neighbors(clients, k, seed, round_):
    """The public graph of who masks with whom: each client -> its sorted neighbours.

    All pairs when k >= len(clients) - 1. Otherwise a Harary graph (SecAgg+): the
    clients shuffled onto a ring by public randomness (seed, round) and each joined
    to its k/2 nearest on either side, k rounded up to even, so every degree is k.
    """
    if k < 1:
        raise ValueError(f"neighbors: k must be at least 1, got {k}")
    clients = sorted(clients)
    m, half = len(clients), (k + 1) // 2
    if 2 * half >= m - 1:
        return {c: [d for d in clients if d != c] for c in clients}
    ring = [int(c) for c in np.random.default_rng([seed, round_, 0x5EC]).permutation(clients)]
    return {ring[i]: sorted(ring[(i + d) % m] for d in range(-half, half + 1) if d) for i in range(m)}


def _p_too_few(k, survive):
    """P[Binomial(k, survive) < threshold(k)]: a client keeps fewer than t of its k neighbours."""
    return sum(math.comb(k, i) * survive**i * (1 - survive) ** (k - i) for i in range(threshold(k)))


def default_neighbors(m, dropout):
    """A neighbour count k for m clients that each drop with probability `dropout`.

    All pairs up to 32 clients. Beyond, a heuristic after Bell et al.'s O(log m)
    degree: the smallest even k >= 2 ceil(log2 m) for which the expected number
    of clients left with fewer than threshold(k) surviving neighbours,
    m P[Binomial(k, 1 - dropout) < threshold(k)], is at most 1e-6; at most m - 1.
    """
    if not 0 <= dropout < 1:
        raise ValueError(f"default_neighbors: dropout must be in [0, 1), got {dropout}")
    if m <= 32:
        return m - 1
    k = 2 * math.ceil(math.log2(m))
    while k < m - 1 and m * _p_too_few(k, 1 - dropout) > 1e-6:
        k += 2
    return min(k, m - 1)


# --- unmasking ------------------------------------------------------------------------------------

def unmask(total, survivors, dropped, graph, publics, self_seeds, dropped_keys, round_):
    """The survivors' encoded sum from their masked sum: minus each survivor's self mask, and
    minus each pairwise mask a survivor added for a neighbour that dropped.

    `self_seeds` (survivors) and `dropped_keys` (dropped clients' raw private keys)
    are the secrets the caller recovered from shares.
    """
    alive = set(survivors)
    if alive & set(dropped) or alive | set(dropped) != set(graph):
        raise ValueError("unmask: survivors and dropped must split the round's clients (the graph's nodes)")
    n = len(total)
    out = np.array(total, dtype=np.uint64)
    for s in survivors:
        out -= prg(self_seeds[s], n)
    for d in dropped:
        key = X25519PrivateKey.from_private_bytes(dropped_keys[d])
        for s in graph[d]:
            if s in alive:
                words = prg(pair_seed(key, publics[s], round_, d, s), n)
                if s < d:  # s added this mask, so take it away; s > d subtracted it
                    out -= words
                else:
                    out += words
    return out


def simulate(updates, dropped, k, seed, round_):
    """One whole round in one process: client -> update in, (masked sum, unmasked float sum) out.

    Every client in `updates` generates secrets and shares them; those in `dropped`
    never send their masked vector.
    """
    clients = sorted(updates)
    graph = neighbors(clients, k, seed, round_)
    mine = {c: ClientSecrets.generate() for c in clients}
    publics = {c: mine[c].public for c in clients}
    held = {}  # (owner, holder) -> (key share, seed share)
    for c in clients:
        t = threshold(len(graph[c]))
        key_shares = split(mine[c].private_bytes(), len(graph[c]), t)
        seed_shares = split(mine[c].self_seed, len(graph[c]), t)
        held.update({(c, j): pair for j, pair in zip(graph[c], zip(key_shares, seed_shares))})
    survivors = [c for c in clients if c not in dropped]
    total = np.zeros(len(updates[clients[0]]), dtype=np.uint64)
    for c in survivors:
        total += mask(encode(updates[c], len(clients)), c, mine[c], {j: publics[j] for j in graph[c]}, round_)
    alive = set(survivors)

    def from_shares(c, which):
        return recover(c, [held[c, j][which] for j in graph[c] if j in alive], graph)

    self_seeds = {s: from_shares(s, 1) for s in survivors}
    dropped_keys = {d: from_shares(d, 0) for d in clients if d in dropped}
    unmasked = unmask(total, survivors, sorted(dropped_keys), graph, publics, self_seeds, dropped_keys, round_)
    return total, decode(unmasked)
