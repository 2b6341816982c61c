"""A word-level LSTM language model trained by your own loop with distml: BPTT columns, clipping, resumable.

    mpirun -n 2 python examples/word_lm.py --epochs 4 --checkpoint-dir ckpt-lm
    kill -USR1 <mpirun's pid>        # every rank stops after the same step, saves, exits 75
    mpirun -n 2 python examples/word_lm.py --epochs 4 --checkpoint-dir ckpt-lm    # goes on from there

The text is real and on every machine: the Python standard library's own modules, as words
(whitespace-separated, an end-of-line token, the most frequent `--vocab` words kept). The recipe
is PyTorch's word_language_model's: the stream laid out in columns, truncated backpropagation
through `--bptt` tokens with the hidden state carried over, SGD at lr 20, gradients clipped to
0.25 (after the reduction, so every rank clips the same average), and the rate cut by 4 when the
validation loss stops falling (ReduceLROnPlateau). Lines marked `# distributed` are all that
differs from a single-process loop.
"""
import argparse
import math
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import distml


class LSTMModel(nn.Module):
    def __init__(self, vocab, embed=64, hidden=128, layers=2, dropout=0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, embed)
        self.rnn = nn.LSTM(embed, hidden, layers, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab)
        self.layers, self.hidden = layers, hidden

    def forward(self, x, state):
        output, state = self.rnn(self.drop(self.encoder(x)), state)
        return self.decoder(self.drop(output)), state

    def init_state(self, batch):
        zeros = torch.zeros(self.layers, batch, self.hidden)
        return zeros, zeros.clone()


def corpus(files, vocab_size):
    """(train, validation) token tensors of the first `files` standard library modules (sorted by name);
    the last tenth of the tokens is the validation text."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:files]
    words = [w for path in paths for line in path.read_text(errors="replace").splitlines()
             for w in line.split() + ["<eos>"]]
    vocab = ["<unk>"] + [w for w, _ in Counter(words).most_common(vocab_size - 1)]
    index = {w: i for i, w in enumerate(vocab)}
    tokens = torch.tensor([index.get(w, 0) for w in words])
    cut = len(tokens) * 9 // 10
    return tokens[:cut], tokens[cut:], len(vocab)


def evaluate(model, data, bptt):
    """Mean loss per token over the ranks' validation columns (each rank holds as many tokens)."""
    model.eval()
    state, total, count = model.init_state(data.size(1)), 0.0, 0
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, bptt):
            x, y = data[i:i + bptt], data[i + 1:i + 1 + bptt]
            output, state = model(x[:len(y)], state)
            total += nn.functional.cross_entropy(output.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    return distml.allreduce(total / count)                       # distributed: the mean over the ranks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=20, help="global columns (split over the ranks)")
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--lr", type=float, default=20.0)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--files", type=int, default=40, help="standard library modules to read")
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--checkpoint-dir", default="checkpoints/word_lm")
    parser.add_argument("--save", help="write the final weights here (rank 0)")
    args = parser.parse_args()

    distml.init()                                  # distributed: MPI, threads per rank, the hang doctor
    train_tokens, val_tokens, vocab = corpus(args.files, args.vocab)
    train = distml.bptt_columns(train_tokens, None, global_batch=args.batch_size)  # distributed: my columns
    val = distml.bptt_columns(val_tokens, None, global_batch=args.batch_size)     # distributed
    torch.manual_seed(args.seed)                   # the same initial weights on every rank
    model = LSTMModel(vocab, args.embed, args.hidden)
    distml.seed(args.seed)                         # distributed: dropout masks of each rank's own
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    optimizer = distml.DistributedOptimizer(optimizer, model)     # distributed: averages the gradients
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.25, patience=0)
    ckpt = distml.Checkpointer(args.checkpoint_dir, model=model, optimizer=optimizer,        # distributed
                               scheduler=scheduler)
    state = ckpt.restore() or {"epoch": 0, "position": 0}         # distributed: None the first time
    if state["epoch"] >= args.epochs:
        distml.print(f"{args.checkpoint_dir} holds a run that has done its {args.epochs} epochs: nothing to do "
                     f"(another --checkpoint-dir starts afresh)")
    distml.print(f"{len(train_tokens):,} training tokens, vocabulary {vocab:,}, {train.size(1)} columns "
                 f"per rank")

    for epoch in range(state["epoch"], args.epochs):
        model.train()
        hidden = model.init_state(train.size(1))
        start = state.pop("position", 0) if epoch == state["epoch"] else 0
        if start and state["rank_state"]:          # distributed: this rank's hidden state, as saved
            hidden = tuple(state["rank_state"]["hidden"])  # (None on another world size: its columns differ)
        for i in range(start, train.size(0) - 1, args.bptt):
            x, y = train[i:i + args.bptt], train[i + 1:i + 1 + args.bptt]
            hidden = tuple(h.detach() for h in hidden)
            optimizer.zero_grad()
            output, hidden = model(x[:len(y)], hidden)
            nn.functional.cross_entropy(output.flatten(0, 1), y.flatten()).backward()
            optimizer.synchronize()                # distributed: the average gradient, before clipping
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()                       # distributed: no second reduction after synchronize()
            if distml.stop_requested():            # distributed: true on every rank at the same step
                path = ckpt.save(epoch=epoch, position=i + args.bptt, rank_state={"hidden": [h.detach() for h in hidden]})
                distml.print(f"stopped by a signal in epoch {epoch + 1} at token row {i + args.bptt}: wrote {path}")
                sys.exit(75)
        val_loss = evaluate(model, val, args.bptt)
        scheduler.step(val_loss)
        distml.print(f"epoch {epoch + 1}: validation loss {val_loss:.3f}, perplexity {math.exp(val_loss):.1f}, "
                     f"lr {optimizer.param_groups[0]['lr']:g}")
        ckpt.save(epoch=epoch + 1, position=0)
    if args.save and distml.is_root():             # distributed: one file, from rank 0
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
