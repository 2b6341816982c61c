"""Unit tests for `distml.data.text.load_text`: blocks, epochs' offsets, the split, tokens, bad inputs."""
import time
import zlib

import numpy as np
import pytest
import torch

from distml.config import UsageError
from distml.data.text import load_text

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


def _text(length, seed):
    """Random text of `length` characters, with a non-ASCII one so chars and bytes differ."""
    letters = np.random.default_rng(seed).choice(list(ALPHABET), size=length - 1)
    return "é" + "".join(letters)


def _corpus(tmp_path, lengths=(400, 300, 350)):
    """A directory of files named so that sorting by relative path orders them: {name: text}."""
    texts = {}
    for i, length in enumerate(lengths):
        name = f"part{i}/file{i}.txt" if i % 2 else f"file{i}.txt"
        path = tmp_path / "corpus" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        texts[name] = _text(length, seed=i)
        path.write_text(texts[name], encoding="utf-8")
    return tmp_path / "corpus", texts


def _offset(seed, epoch, block_size):
    return int(np.random.default_rng([seed, zlib.crc32(b"text-offset"), epoch]).integers(block_size + 1))


def _split_text(text, test_fraction=0.1):
    held_out = int(len(text) * test_fraction)
    return text[:len(text) - held_out], text[len(text) - held_out:]


# -- samples --------------------------------------------------------------------

def test_item_is_a_block_and_its_shift_by_one_token(tmp_path):
    # Prepare
    root, _ = _corpus(tmp_path)
    train, test = load_text(str(root), block_size=16)

    # Execute
    x, y = train[3]

    # Assert
    assert x.shape == (16,) and y.shape == (16,)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert torch.equal(x[1:], y[:-1])
    assert isinstance(train[np.int64(3)][0], torch.Tensor)
    assert torch.equal(train[np.int64(3)][0], x)


def test_items_decode_to_their_files_text_at_the_epochs_offset(tmp_path):
    # Prepare
    root, texts = _corpus(tmp_path)
    block = 16
    train, _ = load_text(str(root), block_size=block, seed=5)
    train.set_epoch(2)
    offset = _offset(5, 2, block)
    names = list(train.files)

    # Execute / Assert: item j of file f reads the file's train text from offset + j * (block + 1)
    seen = {}
    for i in range(len(train)):
        name = names[train.groups[i]]
        j = seen.setdefault(name, 0)
        seen[name] += 1
        x, y = train[i]
        start = offset + j * (block + 1)
        expected = _split_text(texts[name])[0][start:start + block + 1]
        assert train.decode(x) + train.decode(y)[-1] == expected


def test_files_are_sorted_by_relative_path_and_counted_by_the_formula(tmp_path):
    # Prepare
    root, texts = _corpus(tmp_path)
    block = 16

    # Execute
    train, test = load_text(str(root), block_size=block)

    # Assert
    assert train.files == sorted(texts) == ["file0.txt", "file2.txt", "part1/file1.txt"]
    for f, name in enumerate(train.files):
        train_text, test_text = _split_text(texts[name])
        assert np.sum(train.groups == f) == (len(train_text) - block) // (block + 1)
        assert np.sum(test.groups == f) == max(0, (len(test_text) - block) // (block + 1))
    assert train.groups.dtype == np.int64 and np.all(np.diff(train.groups) >= 0)


def test_every_train_item_stays_in_its_file_for_every_offset(tmp_path):
    # Prepare
    root, texts = _corpus(tmp_path, lengths=(300, 37, 200))
    block = 8
    train, _ = load_text(str(root), block_size=block, tokens="bytes")
    bounds = []  # each file's train text as [start, end) in train.tokens
    start = 0
    for name in train.files:
        length = len(texts[name].encode())
        bounds.append((start, start + length - int(length * 0.1)))
        start += length

    # Execute / Assert: every offset 0..block, forced, keeps every block inside its own file
    for offset in range(block + 1):
        train.offset = offset
        for i in range(len(train)):
            lo, hi = bounds[train.groups[i]]
            first = train.starts[i] + offset
            assert lo <= first and first + block + 1 <= hi
            x, _ = train[i]
            assert torch.equal(x, torch.from_numpy(train.tokens[first:first + block].astype(np.int64)))


def test_offsets_differ_by_epoch_and_cover_positions(tmp_path):
    # Prepare
    root, _ = _corpus(tmp_path)
    block = 16
    train, _ = load_text(str(root), block_size=block, seed=1)
    groups = train.groups.copy()

    # Execute
    offsets = []
    for epoch in range(20):
        train.set_epoch(epoch)
        offsets.append(train.offset)
        assert np.array_equal(train.groups, groups)

    # Assert
    assert offsets == [_offset(1, epoch, block) for epoch in range(20)]
    assert len(set(offsets)) > 5 and all(0 <= o <= block for o in offsets)
    a, b = 0, next(e for e in range(20) if offsets[e] != offsets[0])
    train.set_epoch(a)
    x_a = train[0][0]
    train.set_epoch(b)
    x_b = train[0][0]
    assert not torch.equal(x_a, x_b)
    assert torch.equal(x_b, torch.from_numpy(train.tokens[offsets[b]:offsets[b] + block].astype(np.int64)))


def test_set_epoch_is_deterministic_given_the_seed(tmp_path):
    # Prepare
    root, _ = _corpus(tmp_path)
    a, _ = load_text(str(root), block_size=16, seed=7)
    b, _ = load_text(str(root), block_size=16, seed=7)
    c, _ = load_text(str(root), block_size=16, seed=8)

    # Execute
    for dataset in (a, b, c):
        dataset.set_epoch(4)

    # Assert
    assert a.offset == b.offset == _offset(7, 4, 16)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    assert [_offset(7, e, 16) for e in range(10)] != [_offset(8, e, 16) for e in range(10)]


def test_default_epoch_is_zero(tmp_path):
    root, _ = _corpus(tmp_path)
    train, _ = load_text(str(root), block_size=16, seed=2)
    assert train.epoch == 0 and train.offset == _offset(2, 0, 16)


# -- tokens -----------------------------------------------------------------------

def test_chars_are_the_sorted_characters_of_all_text_as_uint16(tmp_path):
    # Prepare: "z" and "Ω" appear only in the test tail, still in the vocabulary
    path = tmp_path / "a.txt"
    path.write_text("b" * 90 + "aaaa" + "cz Ω!" + "b" * 1, encoding="utf-8")

    # Execute
    train, test = load_text(str(path), block_size=3)

    # Assert
    assert train.vocab == test.vocab == " !abczΩ"
    assert train.num_classes == 7
    assert train.tokens.dtype == np.uint16
    assert train.decode(train.tokens) == path.read_text(encoding="utf-8")


def test_bytes_are_256_tokens_of_the_raw_bytes(tmp_path):
    # Prepare
    path = tmp_path / "a.txt"
    path.write_text("héllo wörld " * 20, encoding="utf-8")

    # Execute
    train, _ = load_text(str(path), block_size=4, tokens="bytes")

    # Assert
    assert train.num_classes == 256 and train.tokens.dtype == np.uint8
    assert train.tokens.tobytes() == path.read_bytes()
    assert train.decode(train.tokens) == path.read_text(encoding="utf-8")


def test_chars_and_bytes_give_the_same_text_in_different_units(tmp_path):
    root, texts = _corpus(tmp_path)
    chars, _ = load_text(str(root), block_size=8)
    raw, _ = load_text(str(root), block_size=8, tokens="bytes")
    total = "".join(texts[name] for name in sorted(texts))
    assert len(chars.tokens) == len(total) and len(raw.tokens) == len(total.encode())
    assert chars.num_classes == len(set(total))


# -- test split -------------------------------------------------------------------------

def test_test_blocks_come_from_each_files_tail_at_offset_zero(tmp_path):
    # Prepare
    root, texts = _corpus(tmp_path, lengths=(400, 300))
    block = 8
    _, test = load_text(str(root), block_size=block, test_fraction=0.25, seed=3)

    # Execute
    test.set_epoch(9)  # does nothing to test blocks

    # Assert
    assert test.offset == 0
    seen = {}
    for i in range(len(test)):
        name = test.files[test.groups[i]]
        j = seen.setdefault(name, 0)
        seen[name] += 1
        tail = _split_text(texts[name], 0.25)[1]
        x, y = test[i]
        assert test.decode(x) + test.decode(y)[-1] == tail[j * (block + 1):(j + 1) * (block + 1)]
    assert seen == {name: (len(_split_text(texts[name], 0.25)[1]) - block) // (block + 1) for name in texts}


# -- errors ----------------------------------------------------------------------------------

def _usage_error(spec, **options):
    with pytest.raises(UsageError) as info:
        load_text(spec, **{"block_size": 8, **options})
    message = str(info.value)
    assert message.startswith(f"--dataset text:{spec}: ") and "\n" not in message
    return message


def test_missing_path_is_a_usage_error(tmp_path):
    assert "no such file or directory" in _usage_error(str(tmp_path / "nowhere"))


def test_directory_without_files_is_a_usage_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert "no files" in _usage_error(str(tmp_path / "empty"))


def test_empty_file_and_empty_files_are_usage_errors(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.txt").write_bytes(b"")
    (tmp_path / "dir" / "c.txt").write_bytes(b"")
    assert "the file is empty" in _usage_error(str(tmp_path / "a.txt"))
    assert "all 2 files are empty" in _usage_error(str(tmp_path / "dir"))


def test_non_utf8_file_is_a_usage_error_naming_it(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "good.txt").write_text("fine text " * 30)
    (tmp_path / "dir" / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 30)
    message = _usage_error(str(tmp_path / "dir"))
    assert "latin.txt is not UTF-8 text (byte 3" in message


def test_nul_bytes_are_a_binary_file_usage_error_naming_it(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"ab\0cd" * 40)
    for tokens in ("chars", "bytes"):
        assert "blob.bin contains NUL bytes" in _usage_error(str(tmp_path / "blob.bin"), tokens=tokens)


def test_block_size_too_large_says_how_many_tokens(tmp_path):
    # 100 chars: 90 train, 10 test; block 9 gives 8 train blocks, 0 test blocks
    (tmp_path / "a.txt").write_text("x" * 100)
    message = _usage_error(str(tmp_path / "a.txt"), block_size=9)
    assert "90 train and 10 test tokens give 8 train and 0 test blocks" in message
    assert "--block-size 9 is too large for the text" in message
    train, test = load_text(str(tmp_path / "a.txt"), block_size=4)  # (10 - 4) // 5 = 1 test block
    assert len(train) == 17 and len(test) == 1


def test_a_short_file_gives_no_blocks_but_no_error(tmp_path):
    root, _ = _corpus(tmp_path, lengths=(600, 5))
    train, test = load_text(str(root), block_size=16)
    assert set(train.groups.tolist()) == {0} and train.files == ["file0.txt", "part1/file1.txt"]


def test_bad_settings_are_value_errors(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    for options in ({"tokens": "words"}, {"test_fraction": 0.0}, {"test_fraction": 1.0}, {"block_size": 0}):
        with pytest.raises(ValueError):
            load_text(str(tmp_path / "a.txt"), **{"block_size": 4, **options})


# -- the default: the standard library's source --------------------------------------------------

def test_default_is_the_standard_librarys_source_and_loads_fast():
    # Execute
    start = time.perf_counter()
    train, test = load_text("", block_size=64)
    seconds = time.perf_counter() - start

    # Assert
    assert seconds < 3
    assert len(train.files) > 100 and "os.py" in train.files and all(f.endswith(".py") for f in train.files)
    assert len(train.tokens) > 1_000_000
    assert 90 < train.num_classes < 1000 and train.tokens.dtype == np.uint16
    assert len(train) > 5 * len(test) > 0
    assert len(set(train.groups.tolist())) > 100
