"""A small decoder-only transformer (GPT-2's shape) for next-token prediction on text.

Pre-LayerNorm blocks: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)),
so the residual stream is never normalised and gradients reach the embeddings
unchanged through it. The output head reuses the token embedding (tied weights,
one Parameter): reading a token in and writing it out share one table, which
saves vocab x embed parameters and trains both with every step. The defaults
are nanoGPT's CPU config (4 layers, 4 heads, 128 wide): about 0.8 M parameters
for a vocabulary of ~170 characters, trainable on a laptop's CPU.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "gpt"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees positions 0..t only."""

    def __init__(self, embed, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(embed, 3 * embed)
        self.proj = nn.Linear(embed, embed)
        self.proj.residual = True  # GPT-2 scales its initial weights down (see GPT._init)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x):
        batch, length, embed = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, embed // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, length, head size)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).reshape(batch, length, embed)
        return self.residual_dropout(self.proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward layer: 4x wider, GELU."""

    def __init__(self, embed, dropout):
        super().__init__()
        self.fc = nn.Linear(embed, 4 * embed)
        self.proj = nn.Linear(4 * embed, embed)
        self.proj.residual = True
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, embed, heads, dropout):
        super().__init__()
        self.ln_attention = nn.LayerNorm(embed)
        self.attention = CausalSelfAttention(embed, heads, dropout)
        self.ln_mlp = nn.LayerNorm(embed)
        self.mlp = MLP(embed, dropout)

    def forward(self, x):
        x = x + self.attention(self.ln_attention(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """(batch, length) int64 tokens -> (batch, length, vocab_size) logits of the next token."""

    def __init__(self, vocab_size, block_size, *, layers=4, heads=4, embed=128, dropout=0.0):
        super().__init__()
        if embed % heads != 0:
            raise ValueError(f"embed ({embed}) must be a multiple of heads ({heads}): "
                             f"each head gets embed / heads dimensions")
        if min(vocab_size, block_size, layers, heads) < 1:
            raise ValueError(f"vocab_size, block_size, layers and heads must be at least 1, got "
                             f"{vocab_size}, {block_size}, {layers}, {heads}")
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, embed)
        self.position_embedding = nn.Embedding(block_size, embed)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(embed, heads, dropout) for _ in range(layers))
        self.ln_final = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied: one Parameter
        self.apply(lambda module: _init(module, layers))

    def forward(self, tokens):
        length = tokens.shape[-1]
        if length > self.block_size:
            raise ValueError(f"input of {length} tokens is longer than block_size {self.block_size}")
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


def _init(module, layers):
    """GPT-2's initialisation: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 * layers)), zero biases.

    Each block adds two residual branches to the stream; scaling their output
    weights keeps the stream's variance from growing with depth.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        std = 0.02 / math.sqrt(2 * layers) if getattr(module, "residual", False) else 0.02
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def gpt(vocab_size, block_size, *, layers=4, heads=4, embed=128, dropout=0.0):
    """A GPT for `vocab_size` tokens and contexts of up to `block_size` (nanoGPT's CPU config by default)."""
    return GPT(vocab_size, block_size, layers=layers, heads=heads, embed=embed, dropout=dropout)
