"""The README and docs/ as a user reads them: the tour runs as written, and every `distml train`
command shown takes only flags and values the parser and Config.validate() accept."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from launch import MPI_ENV, launch_python

from distml.cli import build_parser
from distml.config import Config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_lines(text):
    """The lines of fenced code blocks, with backslash continuations joined and comments cut."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.append(line)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [line.split(" # ")[0].strip() for line in joined.splitlines()]


def _train_commands():
    for page in PAGES:
        for line in _code_lines(page.read_text()):
            words = line.split()
            if "train" in words and any(w.endswith("distml") for w in words[:words.index("train")]) \
                    and "..." not in words:
                yield pytest.param(words[words.index("train") + 1:], id=f"{page.name}: {line[:60]}")


@pytest.mark.parametrize("args", list(_train_commands()))
def test_every_train_command_in_the_docs_has_valid_flags(args):
    parsed = vars(build_parser().parse_args(["train", *args]))
    parsed.pop("command")
    Config(**parsed).validate(writes_outputs=False)


def _tour():
    """The README tour's commands, in order."""
    text = (ROOT / "README.md").read_text()
    tour = text.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    return [line for line in _code_lines(tour) if line]


def test_the_readme_tour_runs_as_written(tmp_path):
    """Each command as the README gives it, but the text model for 10 of its 400 steps, scored on
    1% of the text rather than 5% (the rest is a minute of the suite's time; what the 400 reach is
    measured in docs/workload.md)."""
    commands = _tour()
    assert "--max-steps 400" in commands[3] and "--test-fraction 0.05" in commands[3]
    commands[3] += " --max-steps 10 --test-fraction 0.01"  # the last value of a flag wins
    assert len(commands) == 5 and all(c.startswith("mpirun -n 2 .venv/bin/distml train") for c in commands[:4])
    for name in (".venv", "examples"):  # run where the README is, with what a run writes kept out of the tree
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, **MPI_ENV, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    for command in commands:
        done = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
        last = done.stdout.splitlines()[-1]
        assert last.startswith("done: ") or re.match(r"epoch 5: test loss [\d.]+, accuracy 0\.(9|8[5-9])", last), last


def test_the_api_pattern_runs_as_written_and_a_second_run_restores_its_checkpoint(tmp_path):
    text = (ROOT / "docs" / "api.md").read_text()
    block = re.search(r"<!-- the pattern[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "pattern.py").write_text(block)

    done = launch_python(2, "pattern.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    losses = [float(v) for v in re.findall(r"epoch \d: mean loss ([\d.]+)", done.stdout)]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], done.stdout  # printed once, by rank 0; learning
    again = launch_python(2, "pattern.py", cwd=tmp_path)  # all 5 epochs done: restores, trains no more
    assert again.returncode == 0 and "restored" in again.stderr and "epoch" not in again.stdout
