"""Data: every source is a `Dataset` of two map-style splits behind one path.

    digits, diabetes, synthetic, FILE.npz, FILE.csv   arrays.py: numpy arrays, batched reads
    text, text:PATH                                   text.py: blocks of characters or bytes
    FILE.py:fn, module:fn                             user.py: the user's own torch Dataset

`loader.Loader` turns a rank's lists of sample indices into batches, in this
process or in loading workers that never fork an MPI process.
"""
from ..config import UsageError
from ..userfn import is_function_spec
from .arrays import BUILTIN, ArraySplit, Dataset, bundled, from_arrays, check_finite, load_arrays, read_rows, rows_of

__all__ = ["Dataset", "ArraySplit", "from_arrays", "load_dataset", "rows_of", "read_rows", "check_finite", "BUILTIN",
           "bundled"]


def load_dataset(cfg, *, rank=0, size=1):
    """The Dataset `cfg.dataset` names. Array files check their values in block `rank` of `size`."""
    name = cfg.dataset
    if name == "text" or name.startswith("text:"):
        from .text import load_text
        from .user import from_datasets
        if name == "text:":
            raise UsageError("--dataset text: needs a path after the colon (a UTF-8 file or a directory), "
                             "or --dataset text for the Python standard library's sources")
        train, test = load_text(name[5:], block_size=cfg.block_size, tokens=cfg.tokens,
                                test_fraction=cfg.test_fraction, seed=cfg.seed)
        return from_datasets(name, train, test)
    if is_function_spec(name) and not name.endswith((".npz", ".csv")):
        from .user import load_user
        return load_user(cfg)
    return load_arrays(cfg, rank=rank, size=size)
