"""Run Horovod's own PyTorch examples on distml.horovod, changing only their import lines.

    python scripts/horovod_examples/run.py --examples DIR --python VENV/bin/python
                                           [--epochs 20] [--repeats 3] [--num-iters 5] [--out results/horovod]

DIR holds Horovod's examples/pytorch/pytorch_mnist.py and
pytorch_synthetic_benchmark.py (they are Horovod's code, so they are not in
this repository: see the README, "Horovod scripts on distml"). VENV needs
torch, torchvision and this package (`pip install --no-deps -e .`). The
script copies both into --out with `import horovod.torch as hvd` turned into
`import distml.horovod as hvd` and the bare `import horovod` dropped, prints
the diff, writes MNIST-format files made from scikit-learn's digits there
(MNIST cannot be downloaded here), and then:

1. trains pytorch_mnist.py for --epochs on 2 ranks and prints each epoch's test accuracy;
2. runs pytorch_synthetic_benchmark.py (resnet18, batch 8) at 1 and 2 ranks, with and
   without --fp16-allreduce, --repeats times in rotating order, and prints the median of
   each configuration's "Total img/sec", with the min-max, and writes them to a CSV.
"""
import argparse
import difflib
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchlib import ENV, write_csv  # noqa: E402

EXAMPLES = ("pytorch_mnist.py", "pytorch_synthetic_benchmark.py")


def port(source, target):
    """Copy a Horovod example with only its import lines changed; returns the unified diff."""
    original = source.read_text().splitlines(keepends=True)
    ported = [line.replace("import horovod.torch as hvd", "import distml.horovod as hvd")
              for line in original if line.strip() != "import horovod"]
    target.write_text("".join(ported))
    return "".join(difflib.unified_diff(original, ported, f"horovod/{source.name}", f"distml/{source.name}"))


def mpirun(python, ranks, script, *args, cwd):
    mpirun_path = Path(python).parent / "mpirun"
    command = [str(mpirun_path), "-n", str(ranks), "--bind-to", "core", python, script, *map(str, args)]
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return done.stdout


def mnist(python, work, epochs):
    out = mpirun(python, 2, "pytorch_mnist.py", "--epochs", epochs, "--data-dir", work / "data", cwd=work)
    accuracies = [float(a) for a in re.findall(r"Accuracy: ([\d.]+)%", out)]
    print("pytorch_mnist.py, 2 ranks, test accuracy per epoch (%):", " ".join(f"{a:.2f}" for a in accuracies))
    first = next((i + 1 for i, a in enumerate(accuracies) if a >= 90.0), None)
    print(f"first epoch at or above 90%: {first}; last epoch: {accuracies[-1]:.2f}%")
    return accuracies


def synthetic(python, work, repeats, num_iters):
    configs = [(ranks, fp16) for ranks in (1, 2) for fp16 in (False, True)]
    results = {c: [] for c in configs}
    for repeat in range(repeats):
        for ranks, fp16 in configs[repeat % len(configs):] + configs[:repeat % len(configs)]:  # rotating order
            args = ["--model", "resnet18", "--batch-size", 8, "--num-iters", num_iters]
            out = mpirun(python, ranks, "pytorch_synthetic_benchmark.py", *args, *(["--fp16-allreduce"] if fp16 else []),
                         cwd=work)
            total = float(re.search(r"Total img/sec on \d+ CPU\(s\): ([\d.]+)", out).group(1))
            results[(ranks, fp16)].append(total)
            print(f"  repeat {repeat + 1}: {ranks} rank(s){' fp16' if fp16 else ''}: {total:.1f} img/sec", flush=True)
    rows = [{"ranks": r, "fp16_allreduce": f, "img_per_sec_median": statistics.median(v),
             "min": min(v), "max": max(v), "repeats": len(v)} for (r, f), v in results.items()]
    print("\n| ranks | --fp16-allreduce | total img/sec (median) | min-max |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['ranks']} | {'yes' if row['fp16_allreduce'] else 'no'} | {row['img_per_sec_median']:.1f} | "
              f"{row['min']:.1f}-{row['max']:.1f} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, required=True, help="directory with Horovod's two examples")
    parser.add_argument("--python", default=sys.executable, help="a Python with torch, torchvision and distml")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-iters", type=int, default=5, help="the benchmark's timed iterations per run")
    parser.add_argument("--out", type=Path, default=Path("results/horovod"))
    args = parser.parse_args()
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for name in EXAMPLES:
        print(port(args.examples / name, work / name))
    subprocess.run([args.python, str(HERE / "make_mnist_from_digits.py"), str(work / "data")], check=True)
    mnist(args.python, work, args.epochs)
    rows = synthetic(args.python, work, args.repeats, args.num_iters)
    write_csv(rows, os.path.join(work, "synthetic_benchmark.csv"))
    print(f"wrote {work / 'synthetic_benchmark.csv'}")


if __name__ == "__main__":
    main()
