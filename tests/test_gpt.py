"""Unit tests for `distml.gpt`: shapes, tied weights, causality, the loss at init, that it learns, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from distml.gpt import GPT, gpt


def _tokens(batch, length, vocab, seed=0):
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_have_one_row_per_position_and_token():
    # Prepare
    torch.manual_seed(0)
    model = gpt(50, 16, layers=2, heads=2, embed=32)

    # Execute
    logits = model(_tokens(3, 10, 50))

    # Assert
    assert isinstance(model, GPT)
    assert logits.shape == (3, 10, 50) and logits.dtype == torch.float32


def test_head_is_the_token_embedding_and_parameters_match_the_formula():
    # Prepare
    vocab, block, layers, embed = 70, 24, 3, 48
    per_layer = (2 * embed                      # LayerNorm before attention
                 + embed * 3 * embed + 3 * embed  # q, k, v
                 + embed * embed + embed          # attention output projection
                 + 2 * embed                      # LayerNorm before the MLP
                 + embed * 4 * embed + 4 * embed  # MLP up
                 + 4 * embed * embed + embed)     # MLP down
    expected = vocab * embed + block * embed + layers * per_layer + 2 * embed  # + final LayerNorm; head tied

    # Execute
    model = gpt(vocab, block, layers=layers, heads=4, embed=embed)

    # Assert
    assert model.head.weight is model.token_embedding.weight
    assert sum(p is model.head.weight for p in model.parameters()) == 1
    assert sum(p.numel() for p in model.parameters()) == expected


def test_default_is_nanogpts_cpu_config():
    model = gpt(65, 64)
    assert len(model.blocks) == 4 and model.blocks[0].attention.heads == 4
    assert model.token_embedding.weight.shape == (65, 128)


def test_changing_a_token_changes_no_logits_before_it():
    # Prepare
    torch.manual_seed(0)
    model = gpt(30, 12, layers=2, heads=2, embed=16).eval()
    tokens = _tokens(2, 12, 30)
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 30

    # Execute
    with torch.no_grad():
        before, after = model(tokens), model(changed)

    # Assert
    assert torch.allclose(before[:, :7], after[:, :7], atol=0, rtol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = gpt(500, 64, layers=4, heads=4, embed=128)
    residual = model.blocks[0].mlp.proj.weight
    assert abs(model.token_embedding.weight.std().item() - 0.02) < 0.002
    assert abs(residual.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, torch.nn.Linear)
               and m.bias is not None)


def test_loss_at_init_is_about_ln_vocab():
    # Prepare
    torch.manual_seed(0)
    vocab = 100
    model = gpt(vocab, 32, layers=2, heads=2, embed=32)
    x, y = _tokens(16, 32, vocab, seed=1), _tokens(16, 32, vocab, seed=2)

    # Execute
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    # Assert
    assert abs(loss.item() - math.log(vocab)) < 0.1


def test_same_seed_same_model():
    torch.manual_seed(3)
    a = gpt(20, 8, layers=1, heads=2, embed=8, dropout=0.1)
    torch.manual_seed(3)
    b = gpt(20, 8, layers=1, heads=2, embed=8, dropout=0.1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_it_learns_a_repeating_text():
    # Prepare: "abcdefgh" repeated: after one token the next is certain
    torch.manual_seed(0)
    vocab, block = 8, 16
    text = torch.arange(8).repeat(40)
    starts = torch.arange(0, len(text) - block - 1, 8)
    x = torch.stack([text[s:s + block] for s in starts])
    y = torch.stack([text[s + 1:s + block + 1] for s in starts])
    model = gpt(vocab, block, layers=1, heads=2, embed=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    # Execute (one thread: tiny matrices, and no spinning threads on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(200):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)

    # Assert: from ln 8 = 2.08 to almost nothing
    assert loss.item() < 0.05


def test_embed_not_a_multiple_of_heads_is_a_value_error():
    with pytest.raises(ValueError, match="multiple of heads"):
        gpt(10, 8, heads=3, embed=16)


def test_input_longer_than_block_size_is_a_value_error():
    model = gpt(10, 8, layers=1, heads=1, embed=8)
    with pytest.raises(ValueError, match="longer than block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.int64))
