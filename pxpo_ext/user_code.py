"""Import user code named in a string: ``"package.module:name"`` or ``"path/to/file.py:name"``.

This is how ``--reward`` (and the ``scalar`` reward's ``function=``) reach a function the user
wrote, without a package of their own: a ``.py`` file anywhere will do. A file is imported once per
process under a private module name, so naming it twice does not run it twice.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

FORMS = "'package.module:name' or 'path/to/file.py:name'"


class UserCodeError(ValueError):
    """The named user code could not be found or does not have the expected form; the message says what to write."""


def is_import_path(text: str) -> bool:
    """Whether ``text`` has the shape of an import path (``source:name``), as opposed to a plain name."""
    source, sep, attribute = str(text).rpartition(":")
    return bool(sep and source and attribute)


def import_object(spec: str, what: str):
    """The object ``spec`` names; every error is a :class:`UserCodeError` that starts with ``what``."""
    text = str(spec)
    source, _, attribute = text.rpartition(":")  # rpartition: a Windows path's drive colon stays in the source
    if not is_import_path(text) or not attribute.isidentifier():
        raise UserCodeError(f"{what}: {text!r} must look like {FORMS}")
    module = _load_file(Path(source).expanduser(), what) if source.endswith(".py") else _import_module(source, what)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise UserCodeError(f"{what}: {source!r} has no attribute {attribute!r}") from None


def _import_module(name: str, what: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise UserCodeError(f"{what}: cannot import module {name!r} ({error}); put it on PYTHONPATH, "
                         "or name the file instead: 'path/to/file.py:name'") from None


def _load_file(path: Path, what: str):
    if not path.is_file():
        raise UserCodeError(f"{what}: file {str(path)!r} does not exist")
    resolved = path.resolve()
    # One private name per file: a second load reuses the module instead of running the file again.
    name = f"_pxpo_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it, as import does: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def display_name(fn) -> str:
    """What errors call a user's callable: its ``name`` attribute, its ``__name__``, or its type's name."""
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__


def accepts(fn, *args, **kwargs) -> bool:
    """Whether ``fn(*args, **kwargs)`` would bind: how a named object tells a factory from the function it makes."""
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): take it to accept keywords only
        return not args
    return True
