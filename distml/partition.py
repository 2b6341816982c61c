"""How the training set is split over federated clients.

    parts = partition(dataset.y_train, 20, "dirichlet", alpha=0.1, seed=0)
    print(format_histogram(label_histogram(dataset.y_train, parts, dataset.num_classes)))

Three schemes, from the federated-learning literature:

- iid: a seeded shuffle cut into nearly equal parts.
- dirichlet: label skew (Hsu et al. 2019, as in NIID-Bench and FedML): each
  class is split over the clients in proportions drawn from Dirichlet(alpha).
  Small alpha gives each client few classes; large alpha approaches iid.
- shards: McMahan et al.'s pathological split: samples sorted by label are cut
  into `clients * shards_per_client` shards and each client is dealt
  `shards_per_client` of them, so it sees only a few labels.

Every client gets at least one sample, and the split is a pure function of
the labels, the settings and the seed: every rank computes the same one
without any message.
"""
import numpy as np

from .sharding import rng

__all__ = ["SCHEMES", "partition", "natural", "label_histogram", "format_histogram", "plot_histogram"]

SCHEMES = ("iid", "dirichlet", "shards")


def natural(groups):
    """One sorted int64 index array per distinct value of `groups` (the natural clients), in value order."""
    groups = np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    starts = np.flatnonzero(np.diff(groups[order])) + 1
    return [part.astype(np.int64) for part in np.split(order, starts)]


def partition(labels, num_clients, scheme, *, alpha=0.5, shards_per_client=2, seed=0):
    """One sorted int64 index array per client; together a disjoint cover of range(len(labels))."""
    labels = np.asarray(labels)
    _check_args(labels, num_clients, scheme, alpha, shards_per_client)
    gen = rng(seed, "partition")
    if scheme == "iid":
        parts = np.array_split(gen.permutation(len(labels)), num_clients)
    elif scheme == "dirichlet":
        parts = _fill_empty(_dirichlet(labels, num_clients, alpha, gen))
    else:
        parts = _shards(labels, num_clients, shards_per_client, gen)
    return [np.sort(p).astype(np.int64) for p in parts]


def _check_args(labels, num_clients, scheme, alpha, shards_per_client):
    n = len(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if not 1 <= num_clients <= n:
        raise ValueError(f"num_clients must be in [1, {n}] so that every client gets a sample, "
                         f"got {num_clients}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if scheme == "shards" and not 1 <= num_clients * shards_per_client <= n:
        raise ValueError(f"{num_clients} clients x {shards_per_client} shards each must be in [1, {n}] "
                         f"(one sample or more per shard)")


def _dirichlet(labels, num_clients, alpha, gen):
    """Each class's shuffled samples cut over the clients in Dirichlet(alpha) proportions."""
    chunks = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        members = gen.permutation(np.flatnonzero(labels == c))
        shares = gen.dirichlet(np.full(num_clients, float(alpha)))
        # rounded, not floored: flooring hands the last client one sample of every class
        cuts = np.rint(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            chunks[client].append(piece)
    return [np.concatenate(c) for c in chunks]


def _fill_empty(parts):
    """Give each empty client one sample from the currently largest client.

    Deterministic and bounded (one move per empty client), unlike the usual
    redraw-until-no-client-is-small loop. The largest client always has two or
    more samples to spare, since there are no more clients than samples.
    """
    for client in range(len(parts)):
        if len(parts[client]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[client], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    return parts


def _shards(labels, num_clients, shards_per_client, gen):
    """Label-sorted samples cut into equal shards, dealt `shards_per_client` to each client."""
    order = gen.permutation(len(labels))  # shuffled first, so samples of one label come in random order
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, num_clients * shards_per_client)
    deal = gen.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[s] for s in hand]) for hand in deal]


def label_histogram(labels, parts, num_classes):
    """Counts of shape (clients, classes): row k is client k's samples per label."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


def format_histogram(hist):
    """A text table: one row per client with its sample count, classes present and count per class."""
    hist = np.asarray(hist)
    width = max(len(str(hist.max(initial=0))), len(str(hist.shape[1] - 1)), 2)
    total = max(len(str(hist.sum(axis=1).max(initial=0))), 7)
    classes = " ".join(f"{c:>{width}}" for c in range(hist.shape[1]))
    lines = [f"{'client':>6} {'samples':>{total}} {'classes':>7}  {classes}"]
    for k, row in enumerate(hist):
        counts = " ".join(f"{v:>{width}}" for v in row)
        lines.append(f"{k:>6} {row.sum():>{total}} {np.count_nonzero(row):>7}  {counts}")
    return "\n".join(lines)


def plot_histogram(hist, path):
    """A PNG at `path` (written atomically): one stacked bar per client, a colour per class."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, touches no global backend
    from matplotlib.ticker import MaxNLocator
    from .checkpoint import atomic_write
    hist = np.asarray(hist)
    clients, num_classes = hist.shape
    fig = Figure(figsize=(8, min(1.5 + 0.22 * clients, 30)), layout="constrained")
    ax = fig.subplots()
    colours = _class_colours(num_classes)
    left = np.zeros(clients)
    for c in range(num_classes):
        ax.barh(np.arange(clients), hist[:, c], left=left, color=colours[c], label=str(c))
        left += hist[:, c]
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.invert_yaxis()  # client 0 at the top, as in the table
    ax.set_xlabel("samples")
    ax.set_ylabel("client")
    ax.set_title("label histogram per client")
    if num_classes <= 20:
        ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _class_colours(num_classes):
    from matplotlib import colormaps
    if num_classes <= 20:
        cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
        return [cmap(c) for c in range(num_classes)]
    return [colormaps["viridis"](c / (num_classes - 1)) for c in range(num_classes)]
