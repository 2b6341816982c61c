"""Secure aggregation's pure pieces (distml.secagg): fixed point, masks, Shamir, the neighbour graph, whole rounds."""
import itertools
import random

import numpy as np
import pytest
from scipy.stats import chisquare

from distml import secagg
from distml.secagg import (FRACTION_BITS, ClientSecrets, TooFewSurvivors, combine, decode, default_neighbors, encode,
                           mask, neighbors, pair_seed, prg, recover, simulate, split, threshold, value_range)


def _top_byte_p_value(words):
    """Chi-square p-value that the top bytes of uint64 words are uniform over 0..255."""
    counts = np.bincount((words >> np.uint64(56)).astype(np.int64), minlength=256)
    return chisquare(counts).pvalue


def _updates(clients, size, seed=0):
    rng = np.random.default_rng(seed)
    return {c: rng.normal(0, 0.1, size) for c in clients}


# --- fixed point ---

def test_encode_decode_round_trip_is_within_half_a_unit():
    x = np.random.default_rng(0).normal(0, 100, 10_000)

    back = decode(encode(x, 10))

    assert encode(x, 10).dtype == np.uint64 and back.dtype == np.float64
    assert np.max(np.abs(back - x)) <= 2.0 ** -(FRACTION_BITS + 1)


def test_the_sum_of_encodings_decodes_to_the_float_sum():
    rng = np.random.default_rng(1)
    n = 50
    xs = [rng.normal(0, 1, 1000) for _ in range(n)]

    total = np.zeros(1000, dtype=np.uint64)
    for x in xs:
        total += encode(x, n)

    assert np.max(np.abs(decode(total) - np.sum(xs, axis=0))) <= n * 2.0 ** -(FRACTION_BITS + 1)


def test_encode_clips_to_the_range_so_a_full_sum_never_wraps():
    n = 4
    x = np.array([1e30, -1e30, np.inf, -np.inf, value_range(n) / 2])

    total = sum(encode(x, n) for _ in range(n))  # n clients all at the edge

    back = decode(total) / n
    assert np.allclose(back[:4], [value_range(n), -value_range(n)] * 2, rtol=1e-12)
    assert back[4] == value_range(n) / 2
    assert decode(encode(np.array([2.0**31]), 1))[0] > 0  # one client at the very top still positive


def test_encode_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([0.0, np.nan]), 2)


# --- masks ---

def test_prg_is_deterministic_sized_and_keyed_by_its_seed():
    a, b = bytes(32), bytes(31) + b"\x01"

    assert prg(a, 1000).dtype == np.uint64 and len(prg(a, 1000)) == 1000
    assert np.array_equal(prg(a, 1000), prg(a, 1000))
    assert np.array_equal(prg(a, 1000)[:10], prg(a, 10))  # one stream, read to different lengths
    assert np.mean(prg(a, 1000) == prg(b, 1000)) == 0


def test_prg_is_the_chacha20_keystream_on_every_host():
    # RFC 7539 A.1, test vector 1 (zero key, zero nonce): keystream 76 b8 e0 ad a0 f1 3d 90 ..., little-endian words
    assert prg(bytes(32), 2).tolist() == [0x903DF1A0ADE0B876, 0x28BD8653E56A5D40]


def test_prg_top_bytes_are_uniform():
    assert _top_byte_p_value(prg(b"\x07" * 32, 100_000)) > 1e-4


def test_a_masked_vector_looks_uniform_unlike_its_plain_encoding():
    n = 100_000
    encoded = encode(np.random.default_rng(2).normal(0, 0.01, n), 10)
    me, others = ClientSecrets.generate(), {j: ClientSecrets.generate().public for j in (1, 5, 9)}

    masked = mask(encoded, 3, me, others, round_=0)

    assert _top_byte_p_value(encoded) < 1e-100  # small floats: top byte 0x00 or 0xff
    assert _top_byte_p_value(masked) > 1e-4
    assert np.mean(masked == encoded) < 1e-3


def test_pair_seed_is_the_same_from_both_ends_and_bound_to_round_and_pair():
    a, b = ClientSecrets.generate(), ClientSecrets.generate()

    seed = pair_seed(a.private_key, b.public, 5, 2, 7)

    assert len(seed) == 32
    assert seed == pair_seed(b.private_key, a.public, 5, 7, 2)
    assert seed != pair_seed(a.private_key, b.public, 6, 2, 7)
    assert seed != pair_seed(a.private_key, b.public, 5, 2, 8)
    assert seed != pair_seed(a.private_key, ClientSecrets.generate().public, 5, 2, 7)


def test_pairwise_masks_cancel_in_the_sum_leaving_only_self_masks():
    clients = [0, 1, 2, 3]
    mine = {c: ClientSecrets.generate() for c in clients}
    zeros = np.zeros(100, dtype=np.uint64)

    total = sum(mask(zeros, c, mine[c], {j: mine[j].public for j in clients if j != c}, 3) for c in clients)

    assert np.array_equal(total, sum(prg(mine[c].self_seed, 100) for c in clients))


def test_client_secrets_round_trip_through_private_bytes_without_the_self_seed():
    mine = ClientSecrets.generate()

    rebuilt = ClientSecrets.from_private_bytes(mine.private_bytes())

    assert len(mine.public) == 32 and len(mine.self_seed) == 32 and len(mine.private_bytes()) == 32
    assert rebuilt.public == mine.public and rebuilt.self_seed is None


# --- Shamir ---

def test_any_t_of_n_shares_recover_the_secret():
    secret = bytes(range(32))
    shares = split(secret, 6, 4)

    for subset in itertools.combinations(shares, 4):
        assert combine(list(subset)) == secret
    assert combine(shares) == secret
    assert combine(shares[::-1][:5]) == secret


def test_shares_have_one_fixed_length():
    lengths = {len(s) for secret in (bytes(32), b"\xff" * 32) for s in split(secret, 9, 5)}

    assert lengths == {70}


def test_t_minus_1_shares_say_nothing_about_the_secret():
    secret = b"\x42" * 32
    rng = random.Random(0)

    for _ in range(200):
        points = [secagg._parse(s) for s in split(secret, 7, 4, rng=rng)[:3]]
        assert secagg._interpolate_at_zero(points) != int.from_bytes(secret, "big")
    with pytest.raises(ValueError, match="threshold"):
        combine(split(secret, 7, 4)[:3])


def test_split_refuses_a_threshold_above_the_share_count():
    with pytest.raises(ValueError, match="t <= n"):
        split(bytes(32), 3, 4)


def test_threshold_is_a_strict_majority_of_neighbours():
    assert [threshold(k) for k in (1, 2, 8, 9, 10)] == [1, 2, 5, 5, 6]


def test_recover_names_the_counts_when_too_few_neighbours_survived():
    graph = {7: list(range(9))}

    with pytest.raises(TooFewSurvivors, match="client 7: 2 of its 9 neighbours survived, the threshold is 5"):
        recover(7, split(bytes(32), 9, 5)[:2], graph)


# --- the neighbour graph ---

def test_neighbors_with_large_k_is_all_pairs():
    clients = [3, 1, 4, 10]

    graph = neighbors(clients, 3, seed=0, round_=0)

    assert graph == {1: [3, 4, 10], 3: [1, 4, 10], 4: [1, 3, 10], 10: [1, 3, 4]}


@pytest.mark.parametrize("k, degree", [(8, 8), (7, 8), (2, 2)])
def test_neighbors_is_symmetric_with_degree_k_rounded_up_to_even(k, degree):
    clients = list(range(0, 80, 2))

    graph = neighbors(clients, k, seed=1, round_=4)

    assert sorted(graph) == clients
    assert all(len(graph[c]) == degree and c not in graph[c] for c in clients)
    assert all(c in graph[j] for c in clients for j in graph[c])


def test_neighbors_is_public_randomness_of_seed_and_round():
    clients = list(range(40))

    graph = neighbors(clients, 8, 1, 4)

    assert graph == neighbors(clients[::-1], 8, 1, 4)
    assert graph != neighbors(clients, 8, 1, 5) and graph != neighbors(clients, 8, 2, 4)


def test_default_neighbors_is_all_pairs_for_few_clients_and_logarithmic_for_many():
    k = default_neighbors(1000, 0.1)

    assert default_neighbors(10, 0.1) == 9 and default_neighbors(32, 0.5) == 31
    assert k % 2 == 0 and 20 <= k <= 100
    assert 1000 * secagg._p_too_few(k, 0.9) <= 1e-6 < 1000 * secagg._p_too_few(k - 2, 0.9)
    assert default_neighbors(100, 0.9) == 99


# --- whole rounds ---

def _spread_drops(graph, count):
    """`count` clients to drop such that every client keeps threshold-many surviving neighbours."""
    dropped = set()
    for c in sorted(graph):
        trial = dropped | {c}
        if len(dropped) < count and all(len(set(graph[j]) - trial) >= threshold(len(graph[j])) for j in graph):
            dropped = trial
    assert len(dropped) == count, f"cannot drop {count} clients from this graph"
    return dropped


@pytest.mark.parametrize("num_clients, k, num_dropped", [
    (10, 9, 0),  # all pairs, no drops
    (10, 9, 3),  # all pairs, some dropped after masking
    (40, 8, 0),  # k-neighbour graph
    (40, 8, 6),
])
def test_the_unmasked_sum_is_the_sum_of_the_survivors_updates(num_clients, k, num_dropped):
    updates = _updates(range(num_clients), 500)
    dropped = _spread_drops(neighbors(list(updates), k, seed=0, round_=3), num_dropped)

    _, unmasked = simulate(updates, dropped, k, seed=0, round_=3)

    expected = sum(u for c, u in updates.items() if c not in dropped)
    assert np.max(np.abs(unmasked - expected)) < 1e-6


def test_the_masked_sum_before_unmasking_hides_the_plain_sum():
    updates = _updates(range(10), 1000)

    total, _ = simulate(updates, set(), 9, seed=0, round_=0)

    plain = sum(encode(u, 10) for u in updates.values())
    assert np.mean(total == plain) < 1e-3


def test_too_many_dropped_raises_too_few_survivors():
    updates = _updates(range(10), 10)  # all pairs: 9 neighbours each, threshold 5

    with pytest.raises(TooFewSurvivors, match="3 of its 9 neighbours survived, the threshold is 5"):
        simulate(updates, {0, 1, 2, 3, 4, 5}, 9, seed=0, round_=0)
