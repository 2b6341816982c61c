"""Real text for next-token prediction: files cut into blocks of tokens, as a map-style Dataset.

A sample is a block of `block_size + 1` consecutive tokens from one file: x is
its first `block_size` tokens, y its last `block_size` (x shifted by one), so a
model that reads x predicts y at every position at once (as in nanoGPT).

Split. Each file's last `test_fraction` of tokens (rounded down) is its test
text, the rest its train text. Every file is in both splits, so the test loss
measures the same mix of files the model trains on.

Epochs. An epoch is one pass over non-overlapping blocks of each file's train
text. A file with n train tokens gives (n - block_size) // (block_size + 1)
blocks, which leaves room for an offset o in [0, block_size]: block j reads
tokens o + j * (block_size + 1) onwards. `set_epoch(e)` draws o for epoch e
from (seed, "text-offset", e), the same for every file and on every rank, so
item indices and groups never change while, over epochs, every position of the
text starts a block and every token is predicted from every context length.
Test blocks always use offset 0: the test set is the same at each evaluation.

Why blocks never span two files: each file is a natural client for federated
learning (as LEAF's Shakespeare splits the plays by speaking role), and
`groups` names each item's file; a block that joined the end of one file to
the start of the next would belong to neither client and teach the model a
seam that is not in the text.
"""
import operator
import sysconfig
from pathlib import Path

import numpy as np
import torch

from ..config import UsageError
from ..sharding import rng

__all__ = ["load_text", "TextBlocks", "TOKENS"]

TOKENS = ("chars", "bytes")
_MAX_CHARS = 65535  # chars are stored as uint16


class TextBlocks(torch.utils.data.Dataset):
    """Blocks of one split of the text: item i -> (x, y), int64 tensors of shape (block_size,).

    `deterministic`: reading an item draws no random numbers (the trainer need not seed it).

    `tokens` is the whole token array of all files (train and test text); `segments`
    holds each file's (start, length) in it for this split. `groups[i]` is the index
    in `files` of the file item i comes from. `vocab[t]` is token t's character
    (chars: a str) or byte (bytes: a bytes object of range(256)).
    """

    deterministic = True

    def __init__(self, tokens, segments, *, files, vocab, block_size, seed=0, shifting=True):
        self.tokens, self.files, self.vocab = tokens, files, vocab
        self.block_size, self.seed, self.shifting = block_size, seed, shifting
        self.num_classes = len(vocab)
        starts, lengths = np.asarray(segments, dtype=np.int64).reshape(-1, 2).T
        counts = np.maximum(lengths - block_size, 0) // (block_size + 1)
        self.groups = np.repeat(np.arange(len(files), dtype=np.int64), counts)
        first = np.cumsum(counts) - counts  # each file's first item
        local = np.arange(len(self.groups), dtype=np.int64) - first[self.groups]
        self.starts = starts[self.groups] + local * (block_size + 1)  # at offset 0
        self.epoch, self.offset = 0, 0
        self.set_epoch(0)

    def set_epoch(self, epoch):
        """Shift every block by this epoch's offset (train blocks only; test blocks stay put)."""
        self.epoch = epoch
        if self.shifting:
            self.offset = int(rng(self.seed, "text-offset", epoch).integers(self.block_size + 1))

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, index):
        start = int(self.starts[operator.index(index)]) + self.offset
        block = torch.from_numpy(self.tokens[start:start + self.block_size + 1].astype(np.int64))
        return block[:-1], block[1:]

    def decode(self, tokens):
        """The text of a sequence of tokens (a tensor, an array or a list)."""
        ids = np.asarray(tokens, dtype=np.int64)
        if isinstance(self.vocab, bytes):
            return np.frombuffer(self.vocab, dtype=np.uint8)[ids].tobytes().decode("utf-8", "replace")
        return "".join(self.vocab[i] for i in ids.tolist())


def load_text(spec, *, block_size, tokens="chars", test_fraction=0.1, seed=0):
    """(train, test) TextBlocks of the text named by `spec`, cut into blocks of `block_size` (+1).

    `spec`: a UTF-8 file, a directory (all regular files under it, recursively,
    sorted by relative path) or "" for the standard library's own top-level *.py
    files (~168 files, ~4.7 MB: real text every Python install has).
    `tokens`: "chars" (the sorted characters of all the text) or "bytes" (256).
    """
    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    files, paths = _find_files(spec)
    raw = [_read(spec, path, name) for path, name in zip(paths, files)]
    if sum(len(data) for data in raw) == 0:
        what = "the file is" if len(raw) == 1 and spec and Path(spec).is_file() else f"all {len(raw)} files are"
        raise UsageError(f"--dataset text:{spec}: {what} empty")
    token_array, lengths, vocab = (_bytes if tokens == "bytes" else _chars)(spec, raw)
    train_segments, test_segments = _split(lengths, test_fraction)
    blocks = dict(files=files, vocab=vocab, block_size=block_size, seed=seed)
    train = TextBlocks(token_array, train_segments, shifting=True, **blocks)
    test = TextBlocks(token_array, test_segments, shifting=False, **blocks)
    _check_blocks(spec, train, test, train_segments, test_segments, block_size)
    return train, test


def _find_files(spec):
    """(relative names, paths) of the files `spec` names, in the order they are read; in a directory,
    hidden files and directories (.git) are left out."""
    if spec == "":
        root = Path(sysconfig.get_paths()["stdlib"])
        paths = sorted(path for path in root.glob("*.py") if path.is_file())
        return [path.name for path in paths], paths
    root = Path(spec)
    if root.is_file():
        return [root.name], [root]
    if not root.is_dir():
        raise UsageError(f"--dataset text:{spec}: no such file or directory")
    named = sorted((path.relative_to(root).as_posix(), path) for path in root.rglob("*")
                   if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts))
    if not named:
        raise UsageError(f"--dataset text:{spec}: no files in the directory")
    return [name for name, _ in named], [path for _, path in named]


def _read(spec, path, name):
    """The bytes of one file, checked to be text: UTF-8 without NUL bytes."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"--dataset text:{spec}: cannot read {name}: {e.strerror}") from None
    if b"\0" in data:
        raise UsageError(f"--dataset text:{spec}: {name} contains NUL bytes (a binary file, not text)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--dataset text:{spec}: {name} is not UTF-8 text "
                         f"(byte {e.start}: {e.reason})") from None
    return data


def _bytes(spec, raw):
    """Each file's raw bytes as tokens: vocabulary 256, nothing to learn from the text."""
    tokens = np.frombuffer(b"".join(raw), dtype=np.uint8)
    return tokens, [len(data) for data in raw], bytes(range(256))


def _chars(spec, raw):
    """Characters as tokens 0..V-1 in code-point order, by a lookup table over all code points.

    A table indexed by code point (bincount, then cumsum) is linear in the text,
    where np.unique would sort it: 4.7 MB of text in about 30 ms.
    """
    texts = [data.decode("utf-8") for data in raw]
    points = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    present = np.flatnonzero(np.bincount(points))
    if len(present) > _MAX_CHARS:
        raise UsageError(f"--dataset text:{spec}: {len(present)} distinct characters, more than "
                         f"{_MAX_CHARS}; use bytes as tokens")
    table = np.zeros(int(present[-1]) + 1, dtype=np.uint16)
    table[present] = np.arange(len(present), dtype=np.uint16)
    vocab = "".join(map(chr, present.tolist()))
    return table[points], [len(text) for text in texts], vocab


def _split(lengths, test_fraction):
    """Per file, (start, length) of its train text and of its test text (the last test_fraction)."""
    starts = np.cumsum(lengths) - lengths
    train, test = [], []
    for start, length in zip(starts.tolist(), lengths):
        held_out = int(length * test_fraction)
        train.append((start, length - held_out))
        test.append((start + length - held_out, held_out))
    return train, test


def _check_blocks(spec, train, test, train_segments, test_segments, block_size):
    """UsageError unless both splits have at least one block."""
    if len(train) >= 1 and len(test) >= 1:
        return
    n_train = sum(length for _, length in train_segments)
    n_test = sum(length for _, length in test_segments)
    raise UsageError(f"--dataset text:{spec}: {n_train} train and {n_test} test tokens give {len(train)} "
                     f"train and {len(test)} test blocks of {block_size + 1} tokens (at least 1 of each is "
                     f"needed): --block-size {block_size} is too large for the text")
