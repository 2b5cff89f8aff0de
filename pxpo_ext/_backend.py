"""Which implementation of the ops runs: ``torch`` (reference), ``cpu``/``cuda`` (the C++/CUDA
extension ``pxpo_ext._C``) or ``triton``.

Every backend is a module exposing the same four functions in the normalised form described
in :mod:`pxpo_ext.reference`: ``gaussian_logprob``, ``reward_to_latent``, ``pxpo_loss`` and
``pxpo_loss_and_grad``. Native code and Triton are imported lazily, on first use, so
``import pxpo_ext`` needs neither a compiler, CUDA nor triton.

Selection: ``PXPO_BACKEND=torch|cpu|cuda|triton`` (or :func:`use_backend`) forces one and
fails loudly when it cannot run; unset, CUDA tensors take ``cuda`` then ``triton`` then
``torch``, CPU tensors take ``cpu`` then ``torch``. Triton on CPU tensors only runs under
``TRITON_INTERPRET=1`` and only when asked for.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
ENV_VAR = "PXPO_BACKEND"

_modules: dict[str, object] = {}
_errors: dict[str, str] = {}
_override = threading.local()


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot run here; the message says why and what to do."""


def _import(name: str):
    if name == "torch":
        return importlib.import_module("pxpo_ext.reference")
    if name in ("cpu", "cuda"):
        native = importlib.import_module("pxpo_ext._native")
        native.load()  # raises BackendUnavailable with the reason
        if name == "cuda" and not native.has_cuda():
            raise BackendUnavailable(
                "pxpo_ext._C was built without CUDA kernels; rebuild with a CUDA toolkit and a CUDA build "
                "of torch (PXPO_FORCE_CUDA=1 pip install --no-build-isolation -e .)"
            )
        return native
    if name == "triton":
        mod = importlib.import_module("pxpo_ext._triton")
        mod.check_available()
        return mod
    raise BackendUnavailable(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def load(name: str):
    """The backend module ``name``, importing it once; raises :class:`BackendUnavailable`."""
    if name in _modules:
        return _modules[name]
    if name in _errors:
        raise BackendUnavailable(_errors[name])
    try:
        mod = _import(name)
    except BackendUnavailable as e:
        _errors[name] = str(e)
        raise
    except ImportError as e:  # a missing optional dependency or a broken build
        _errors[name] = f"backend {name!r} cannot be imported: {e}"
        raise BackendUnavailable(_errors[name]) from e
    _modules[name] = mod
    return mod


def available(name: str) -> bool:
    try:
        load(name)
    except BackendUnavailable:
        return False
    return True


def forced() -> str | None:
    """The backend forced by :func:`use_backend` or ``PXPO_BACKEND``, else ``None``."""
    name = getattr(_override, "name", None) or os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        raise BackendUnavailable(f"{ENV_VAR}={name!r} is not a backend: choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force ``name`` for the ops called inside the block (``None`` restores automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def _device_ok(name: str, device: torch.device) -> None:
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailable(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailable(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment")


def select(device: torch.device):
    """The backend module for tensors on ``device``."""
    name = forced()
    if name is not None:
        _device_ok(name, device)
        return load(name)
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
    for candidate in order:
        if available(candidate):
            return _modules[candidate]
    raise BackendUnavailable(f"no backend runs on {device}")  # unreachable: torch always loads


def info() -> dict[str, str]:
    """Each backend's state: ``"ok"`` or the reason it is unavailable."""
    return {name: ("ok" if available(name) else _errors.get(name, "unavailable")) for name in BACKENDS}
