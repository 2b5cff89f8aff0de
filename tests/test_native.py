"""The C++ extension ``pxpo_ext._C``: operator registration (opcheck), gradients (gradcheck in
float64 through the public ops), torch.compile tracing, determinism, direct-call argument
checks and build information. Kernel-versus-reference values for every backend are in
tests/test_ops.py.

Skipped when the extension is not built (``PXPO_REQUIRE_NATIVE=1`` turns that into a failure).
"""
import os
import subprocess
import sys

import pytest
import torch

import pxpo_ext
from pxpo_ext import _backend, _native
from pxpo_ext import reference as ref
from pxpo_ext.reference import ELEMENT, MEAN, PIXEL, PPO, SF

if not _backend.available("cpu"):
    reason = _backend.info()["cpu"]
    if os.environ.get("PXPO_REQUIRE_NATIVE") == "1":
        pytest.fail(f"the C++ extension must be built here: {reason}", pytrace=False)
    pytest.skip(f"pxpo_ext._C is not built: {reason}", allow_module_level=True)

OPS = torch.ops.pxpo
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _native.has_cuda() else [])


def wide(device):
    """float64 on the CPU (the CUDA kernels take float32/float16/bfloat16 only)."""
    return torch.float64 if device == "cpu" else torch.float32


def latents(shape, dtype, device="cpu", requires_grad=False):
    b = shape[0]
    mean = torch.randn(shape, device=device).to(dtype)
    std = (0.5 + torch.rand(b, device=device)).to(torch.float64 if dtype == torch.float64 else torch.float32)
    x = (mean.to(std.dtype) + std.view(-1, 1, 1, 1) * torch.randn(shape, device=device, dtype=std.dtype)).to(dtype)
    return x, mean.requires_grad_(requires_grad), std


def loss_args(shape, dtype, granularity, device="cpu", weighted=True, spread=0.05, requires_grad=False,
              per_element_adv=False, loss_type=PPO):
    """Normalised pxpo_loss arguments; ``spread`` sets how far old log-probs sit from the new ones."""
    x, mean, std = latents(shape, dtype, device, requires_grad)
    b, c, h, w = shape
    aux = torch.float64 if dtype == torch.float64 else torch.float32
    logp = ref.gaussian_logprob(x, mean.detach(), std, granularity).to(aux)
    logp_old = logp + spread * torch.randn_like(logp)
    adv_shape = {MEAN: (b,), PIXEL: (b, h, w), ELEMENT: (b, c, h, w) if per_element_adv else (b, h, w)}[granularity]
    adv = torch.randn(adv_shape, device=device, dtype=aux)
    weight = None
    if weighted and granularity != MEAN:
        weight = torch.rand(b, h, w, device=device, dtype=aux)
        weight[weight < 0.25] = 0
    return x, mean, std, logp_old, adv, weight, 0.2, granularity, loss_type


def loss_samples(device, requires_grad):
    """One sample per granularity, loss type, dtype and optional input, not their product (opcheck is slow)."""
    return [
        loss_args((2, 3, 4, 5), torch.float32, ELEMENT, device, requires_grad=requires_grad, per_element_adv=True),
        loss_args((2, 3, 4, 5), torch.float16, PIXEL, device, requires_grad=requires_grad, loss_type=SF),
        loss_args((2, 4, 8, 8), torch.bfloat16, PIXEL, device, weighted=False, requires_grad=requires_grad),
        loss_args((2, 3, 4, 5), wide(device), MEAN, device, requires_grad=requires_grad),
    ]


# ---------------------------------------------------------------- registration

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_gaussian_logprob(device, requires_grad):
    for dtype, granularity in ((torch.float32, ELEMENT), (torch.bfloat16, PIXEL), (wide(device), MEAN)):
        x, mean, std = latents((2, 3, 4, 5), dtype, device, requires_grad)
        torch.library.opcheck(OPS.gaussian_logprob.default, (x, mean, std, granularity))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gaussian_logprob_backward(device):
    for dtype, granularity in ((torch.float16, ELEMENT), (torch.float32, PIXEL), (wide(device), MEAN)):
        x, mean, std = latents((2, 3, 4, 5), dtype, device)
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        grad = torch.randn(_native._unit_shape(x, granularity), device=device, dtype=out_dtype)
        torch.library.opcheck(OPS.gaussian_logprob_backward.default, (grad, x, mean, std, granularity))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_reward_to_latent(device):
    reward = torch.randn(2, 16, 16, device=device)
    torch.library.opcheck(OPS.reward_to_latent.default, (reward, torch.rand_like(reward), 2, 2))
    reward = torch.randn(2, 13, 10, device=device, dtype=torch.float64)
    torch.library.opcheck(OPS.reward_to_latent.default, (reward, None, 4, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_pxpo_loss(device, requires_grad):
    for args in loss_samples(device, requires_grad):
        torch.library.opcheck(OPS.pxpo_loss.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_pxpo_loss_and_grad(device):
    """The fast path's op: no autograd formula, the same outputs as pxpo_loss."""
    for args in loss_samples(device, False):
        torch.library.opcheck(OPS.pxpo_loss_and_grad.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
        for a, b in zip(OPS.pxpo_loss_and_grad(*args), OPS.pxpo_loss(*args)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- gradients (float64, through the public ops)

@pytest.mark.parametrize("granularity", ["element", "pixel", "mean"])
def test_gradcheck_gaussian_logprob(granularity):
    x, mean, std = latents((2, 3, 3, 4), torch.float64, requires_grad=True)
    with pxpo_ext.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda m: pxpo_ext.gaussian_logprob(x, m, std, granularity), (mean,))


@pytest.mark.parametrize("granularity", [ELEMENT, PIXEL, MEAN])
@pytest.mark.parametrize("loss_type", ["ppo", "sf"])
@pytest.mark.parametrize("spread", [0.05, 2.0], ids=["inside-clip", "mostly-clipped"])
def test_gradcheck_pxpo_loss(granularity, loss_type, spread):
    # Ratios sit well inside the clip range or mostly outside it; finite differences of 1e-6
    # do not cross the clip boundary, where the loss has a kink.
    x, mean, std, logp_old, adv, weight, clip, _, _ = loss_args((2, 3, 3, 4), torch.float64, granularity,
                                                                spread=spread, requires_grad=True)
    name = {ELEMENT: "element", PIXEL: "pixel", MEAN: "mean"}[granularity]

    def loss(m):
        return pxpo_ext.pxpo_loss(x, m, std, logp_old, adv, weight, clip, name, loss_type)[0]

    with pxpo_ext.use_backend("cpu"):
        assert torch.autograd.gradcheck(loss, (mean,))


def test_backward_scales_the_stored_gradient():
    args = loss_args((2, 4, 6, 6), torch.float32, PIXEL, requires_grad=True)
    loss, grad_mean, _ = OPS.pxpo_loss(*args)
    (3.5 * loss).backward()
    torch.testing.assert_close(args[1].grad, 3.5 * grad_mean)


# ---------------------------------------------------------------- torch.compile

def test_torch_compile_fullgraph_traces_every_op():
    torch._dynamo.reset()

    def step(x, mean, std, logp_old, adv, weight, reward):
        r, w = OPS.reward_to_latent(reward, None, 4, 4)
        lp = OPS.gaussian_logprob(x, mean, std, PIXEL)
        loss, grad, stats = OPS.pxpo_loss(x, mean, std, logp_old, adv * r, weight * w, 0.2, PIXEL, PPO)
        return loss + lp.mean(), grad, stats

    args = loss_args((2, 4, 4, 4), torch.float32, PIXEL, requires_grad=True)
    reward = torch.randn(2, 16, 16)
    inputs = (args[0], args[1], args[2], args[3], args[4], args[5], reward)
    # inductor (it generates and compiles C++ for the glue around the ops; ~25 s on a 2-core CPU)
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    got = compiled(*inputs)
    want = step(*inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    (g_compiled,) = torch.autograd.grad(got[0], args[1])
    (g_eager,) = torch.autograd.grad(want[0], args[1])
    torch.testing.assert_close(g_compiled, g_eager)


# ---------------------------------------------------------------- determinism, errors, build

@pytest.mark.parametrize("granularity", [ELEMENT, PIXEL, MEAN])
def test_cpu_results_do_not_depend_on_thread_count(granularity):
    args = loss_args((3, 4, 48, 48), torch.float32, granularity)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.pxpo_loss(*args)
        torch.set_num_threads(2)
        two = OPS.pxpo_loss(*args)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("granularity", [ELEMENT, PIXEL, MEAN])
def test_cuda_results_are_bit_identical_across_runs(granularity):
    # Many blocks per image and a large batch: the reductions must not depend on block order.
    args = loss_args((64, 4, 64, 64), torch.bfloat16, granularity, device="cuda")
    first = OPS.pxpo_loss(*args)
    for _ in range(3):
        for a, b in zip(first, OPS.pxpo_loss(*args)):
            assert torch.equal(a, b)


def _loss_outputs_equal(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and the CUDA kernels")
@pytest.mark.parametrize("granularity", [PIXEL, MEAN])
def test_cuda_loss_replays_in_a_cuda_graph(granularity):
    # Training under CUDA graphs (torch.compile's reduce-overhead, hand capture) replays the op on new inputs.
    static = loss_args((16, 4, 64, 64), torch.float32, granularity, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = OPS.pxpo_loss_and_grad(*static)
    for _ in range(3):
        fresh = loss_args((16, 4, 64, 64), torch.float32, granularity, device="cuda")
        for dst, src in zip(static, fresh):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        assert _loss_outputs_equal(captured, OPS.pxpo_loss_and_grad(*fresh))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and the CUDA kernels")
def test_cuda_loss_first_called_inside_a_graph_capture():
    # A fresh process whose first call is captured: the op's lazy per-device set-up must be legal in a capture.
    code = """
import torch, pxpo_ext  # noqa: F401
from tests.test_native import loss_args, _loss_outputs_equal
from pxpo_ext.reference import PIXEL
args = loss_args((4, 4, 16, 16), torch.float32, PIXEL, device="cuda")
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    captured = torch.ops.pxpo.pxpo_loss_and_grad(*args)
graph.replay()
assert _loss_outputs_equal(captured, torch.ops.pxpo.pxpo_loss_and_grad(*args))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and the CUDA kernels")
def test_cuda_loss_on_concurrent_streams():
    # Launches of different grid sizes on several streams at once share no state.
    cases = [loss_args(shape, torch.float32, PIXEL, device="cuda") for shape in ((1, 4, 64, 64), (64, 4, 64, 64),
                                                                                    (3, 4, 8, 8))]
    expected = [OPS.pxpo_loss_and_grad(*args) for args in cases]
    streams = [torch.cuda.Stream() for _ in cases]
    torch.cuda.synchronize()
    results = [[] for _ in cases]
    for _ in range(20):
        for args, stream, out in zip(cases, streams, results):
            with torch.cuda.stream(stream):
                out.append(OPS.pxpo_loss_and_grad(*args))
    torch.cuda.synchronize()
    for want, got in zip(expected, results):
        assert all(_loss_outputs_equal(want, g) for g in got)


def test_direct_calls_with_wrong_shapes_fail_clearly():
    x, mean, std, logp_old, adv, weight, clip, gran, kind = loss_args((2, 3, 4, 5), torch.float32, PIXEL)
    with pytest.raises(RuntimeError, match="logp_old must have shape"):
        OPS.pxpo_loss(x, mean, std, logp_old[:, :2], adv, weight, clip, gran, kind)
    with pytest.raises(RuntimeError, match="granularity code"):
        OPS.gaussian_logprob(x, mean, std, 7)
    with pytest.raises(RuntimeError, match="std must have shape"):
        OPS.gaussian_logprob(x, mean, std[:1], PIXEL)
    with pytest.raises(RuntimeError, match="takes no weight map"):
        OPS.pxpo_loss(x, mean, std, logp_old.sum((1, 2)), adv.sum((1, 2)), weight, clip, MEAN, kind)
    with pytest.raises(RuntimeError, match="weight must have the reward's shape"):
        OPS.reward_to_latent(torch.rand(2, 8, 8), torch.rand(2, 8, 4), 2, 2)
    with pytest.raises(RuntimeError, match="reward maps must not be empty"):
        OPS.reward_to_latent(torch.rand(2, 0, 8), None, 2, 2)


def test_non_integer_pooling_matches_adaptive_avg_pool():
    reward = torch.randn(3, 11, 7, dtype=torch.float64)
    r, w = OPS.reward_to_latent(reward, None, 4, 3)
    want = torch.nn.functional.adaptive_avg_pool2d(reward.unsqueeze(1), (4, 3)).squeeze(1)
    torch.testing.assert_close(r, want)
    assert torch.equal(w, torch.ones_like(w))


def test_build_info():
    info = _native.build_info()
    assert info["version"] == pxpo_ext.__version__
    assert info["cuda"] == _native.has_cuda()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["openmp"], bool) and info["compiler"]


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setitem(sys.modules, "pxpo_ext._C", None)  # makes the import fail
    with pytest.raises(pxpo_ext.BackendUnavailable, match="pip install --no-build-isolation -e ."):
        _native.load()
