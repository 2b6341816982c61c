"""Memory of the sharded optimizer: what each rank holds at --zero 0, 1 and 2, measured against ZeRO's formulas.

    .venv/bin/python scripts/bench_zero_memory.py [--ranks 1,2,3] [--steps 6] [--models mlp10m,text]

Runs the real CLI (`mpirun -n N python -m distml train --max-steps STEPS --zero Z`) for each
model, optimizer (SGD momentum, AdamW), rank count and stage, and reads the summary's
`optimizer_state_bytes` and `gradient_bytes` (the sizes of the buffers the most loaded rank holds
between steps), `gradient_peak_bytes` (stage 2: plus the most bytes of whole gradients that
backward's hooks saw alive at once before their bucket was reduced and freed) and `peak_rss_mib`
(the largest peak resident set of any rank, from getrusage: measured by the kernel).
The formulas, for P float32 parameters and K bytes of optimizer state a parameter
(SGD momentum 4, AdamW 8), N ranks: stage 0 holds 4P (weights) + 4P (gradients) + KP;
stage 1, 4P + 4P + KP/N; stage 2, 4P + 4P/N + KP/N, plus one bucket of whole gradients
(--bucket-mb) while it is copied out. (ZeRO's paper counts mixed-precision Adam: 2 + 2 + 12
bytes, 2 + 2 + 12/N and 2 + 14/N; distml trains in float32 without a master copy.)
Table: state and gradient bytes a rank, their ratio to the formula, the gradients' peak, peak RSS.
Writes results/bench_zero_memory.csv.
"""
import argparse
import os
import sys
import tempfile

from benchlib import train_records, write_csv

MODELS = {  # name: (flags, parameters)
    "mlp10m": (["--dataset", "synthetic", "--features", 784, "--classes", 10, "--samples", 1024, "--model", "mlp",
                "--hidden", "2048,2048,2048", "--batch-size", 32], 784 * 2048 + 2048 + 2 * (2048 * 2048 + 2048)
               + 2048 * 10 + 10),
    "text": (["--dataset", "text", "--model", "gpt", "--block-size", 64, "--batch-size", 12], None),
}
STATE_BYTES = {"sgd": 4, "adamw": 8}  # a parameter's optimizer state: momentum; AdamW's two moments


def expected(params, optimizer, ranks, stage):
    """(state, gradient) bytes a rank holds by the formulas above (without padding or the stage-2 bucket)."""
    state = STATE_BYTES[optimizer] * params / (ranks if stage else 1)
    return state, 4 * params / (ranks if stage == 2 else 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,3")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--optimizers", default="sgd,adamw")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--csv", default="results/bench_zero_memory.csv")
    args = ap.parse_args()
    rows = []
    print(f"# load avg before {os.getloadavg()[0]:.2f}")
    print("| model | optimizer | ranks | zero | state MB/rank | x formula | gradient MB/rank | x formula "
          "| gradient peak MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        flags, params = MODELS[model]
        for optimizer in args.optimizers.split(","):
            for ranks in map(int, args.ranks.split(",")):
                for stage in (0, 1, 2) if ranks > 1 else (0,):
                    with tempfile.TemporaryDirectory() as tmp:
                        records = train_records(ranks, [*flags, "--optimizer", optimizer, "--zero", stage,
                                                        "--max-steps", args.steps, "--threads", 1,
                                                        ],
                                                os.path.join(tmp, "m.jsonl"))
                    summary = records[-1]
                    if params is None:  # the text model: from stage 0 at one rank's gradient buffers
                        params = summary["gradient_bytes"] // 4
                    state, grads = expected(params, optimizer, ranks, stage)
                    row = {"model": model, "optimizer": optimizer, "ranks": ranks, "zero": stage,
                           "parameters": params, "state_bytes": summary["optimizer_state_bytes"],
                           "state_expected": state, "gradient_bytes": summary["gradient_bytes"],
                           "gradient_expected": grads, "gradient_peak_bytes": summary["gradient_peak_bytes"],
                           "peak_rss_mib": summary["peak_rss_mib"]}
                    rows.append(row)
                    print(f"| {model} | {optimizer} | {ranks} | {stage} | {row['state_bytes'] / 1e6:.2f} | "
                          f"{row['state_bytes'] / state:.3f} | {row['gradient_bytes'] / 1e6:.2f} | "
                          f"{row['gradient_bytes'] / grads:.3f} | {row['gradient_peak_bytes'] / 1e6:.2f} | "
                          f"{row['peak_rss_mib']:.0f} |", flush=True)
    write_csv(rows, args.csv)
    print(f"# load avg after {os.getloadavg()[0]:.2f}; wrote {args.csv}")


if __name__ == "__main__":
    sys.exit(main())
