"""Shared test fixtures: every available backend of the ops, seeded inputs, dtype-tied tolerances."""
import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU; it must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pxpo_ext  # noqa: E402
from pxpo_ext import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def backend_device(name: str) -> str:
    if name == "cuda":
        return "cuda"
    if name == "triton":
        return "cuda" if HAS_CUDA else "cpu"
    return "cpu"


def _backend_params():
    params = []
    for name in _backend.BACKENDS:
        marks = []
        if name == "cuda" and not HAS_CUDA:
            marks.append(pytest.mark.skip(reason="no CUDA device"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _skip_unless_available(name: str) -> None:
    """Skip the test when backend ``name`` cannot run here; fail instead for the C++ one under PXPO_REQUIRE_NATIVE=1."""
    if not _backend.available(name):
        reason = _backend.info()[name]
        if name == "cpu" and os.environ.get("PXPO_REQUIRE_NATIVE") == "1":
            pytest.fail(f"the C++ extension must be built here: {reason}")
        pytest.skip(f"backend {name} unavailable: {reason}")


@pytest.fixture(params=_backend_params())
def backend(request):
    """The name of a backend that runs here, forced for the duration of the test."""
    name = request.param
    _skip_unless_available(name)
    with pxpo_ext.use_backend(name):
        yield name


@pytest.fixture
def native_cpu():
    """For tests that need the C++ extension (``pxpo_ext._C``) built, without forcing a backend."""
    _skip_unless_available("cpu")


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# (atol, rtol) for comparing a kernel against the float32 reference computed from the same inputs.
TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float64: (1e-10, 1e-8),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Folder of a random-weight Stable-Diffusion-style pipeline (16x16 images), built once per test run."""
    from tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    """Folder of a random-weight SDXL pipeline (two text encoders, pooled embedding, time ids; 16x16 images)."""
    from tiny_pipeline import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))
