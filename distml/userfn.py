"""The user's own functions, named on the command line as `module:function` or `path/to/file.py:function`.

`--model`, `--dataset` and `--loss` take them. A file is imported under a name
made from its path, kept in `FILES`, so that loading workers (other processes)
can import it again by that name before unpickling objects of its classes.
"""
import importlib
import importlib.util
import os
import sys
import zlib

from .config import UsageError

__all__ = ["load_function", "is_function_spec", "import_file", "FILES"]

FILES = {}  # module name -> file path, for every file imported here


def is_function_spec(spec):
    """Whether `spec` names a function (module:function, file.py:function) rather than a file or a name."""
    where, sep, func = spec.rpartition(":")
    return bool(sep and where and func.isidentifier())


def load_function(spec, flag):
    """The callable `spec` names; UsageError (naming `flag`) if it cannot be imported or found."""
    where, _, func = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise UsageError(f"--{flag}: no such file: {where}")
            module = import_file(where)
        else:
            module = importlib.import_module(where)
    except UsageError:
        raise
    except Exception as e:  # the user's module failed to import: report it as their mistake
        raise UsageError(f"--{flag} {spec}: cannot import {where}: {type(e).__name__}: {e}")
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"--{flag} {spec}: {where} has no function {func!r}")
    return fn


def import_file(path):
    """The module of the Python file at `path`, imported once per process under a name of its own."""
    path = os.path.abspath(path)
    name = "distml_user_%s_%08x" % (os.path.splitext(os.path.basename(path))[0], zlib.crc32(path.encode()))
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        loader.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    FILES[name] = path
    return module
