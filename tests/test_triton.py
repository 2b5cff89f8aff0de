"""The Triton backend against the reference: kernels, their edge cases, torch.library and torch.compile.

Without a GPU the kernels run under triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported), which is slow: shapes stay tiny. The general all-backend suite is tests/test_ops.py.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the triton backend needs the triton package")
import triton.language as tl  # noqa: E402

from pxpo_ext import _backend  # noqa: E402
from pxpo_ext import reference as ref  # noqa: E402
from pxpo_ext.reference import ELEMENT, MEAN, PIXEL, PPO, SF  # noqa: E402

from conftest import TOL  # noqa: E402

if not _backend.available("triton"):
    pytest.skip(f"triton backend unavailable: {_backend.info()['triton']}", allow_module_level=True)

import pxpo_ext._triton as T  # noqa: E402
from pxpo_ext.triton_kernels import launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRANULARITIES = [ELEMENT, PIXEL, MEAN]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 elements, so tiny latents span many blocks and several programs share an image."""
    monkeypatch.setattr(launch, "MAX_TILE_ELEMENTS", 8)


def latents(shape, dtype, layout="contiguous"):
    b = shape[0]
    mean = torch.randn(shape, device=DEVICE).to(dtype)
    std = 0.3 + torch.rand(b, device=DEVICE)
    x = (mean.float() + std.view(-1, 1, 1, 1) * torch.randn(shape, device=DEVICE)).to(dtype)
    if layout == "channels_last":
        x, mean = (t.contiguous(memory_format=torch.channels_last) for t in (x, mean))
    elif layout == "sliced":  # every other column of a wider latent: no unit stride anywhere useful
        x, mean = (torch.cat([t, t], dim=-1)[..., ::2] for t in (x, mean))
    return x, mean, std


def loss_inputs(shape, dtype, granularity, layout="contiguous", per_element_adv=False, weights=True):
    x, mean, std = latents(shape, dtype, layout)
    b, c, h, w = shape
    logp = ref.gaussian_logprob(x, mean, std, granularity)
    logp_old = logp + 0.3 * torch.randn_like(logp)
    if granularity == MEAN:
        adv, weight = torch.randn(b, device=DEVICE), None
    else:
        adv = torch.randn((b, c, h, w) if per_element_adv else (b, h, w), device=DEVICE)
        weight = torch.rand(b, h, w, device=DEVICE) if weights else None
        if weights:
            weight[weight < 0.2] = 0.0
            if b > 1:
                weight[-1] = 0.0  # an image with no feedback at all: L_b = 0
    return x, mean, std, logp_old, adv, weight


def assert_grad_close(got, want, dtype):
    atol, rtol = TOL[dtype]
    assert got.dtype == dtype and got.shape == want.shape
    scale = max(want.abs().max().item(), 1e-30)
    torch.testing.assert_close(got.float(), want.float(), atol=atol * scale, rtol=rtol)


def assert_loss_matches_reference(args):
    loss, grad, stats = T.pxpo_loss_and_grad(*args)
    want_loss, want_grad, want_stats = ref.pxpo_loss_and_grad(*args)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats, want_stats, atol=1e-5, rtol=1e-5)
    assert_grad_close(grad, want_grad, args[1].dtype)
    return stats


# ---------------------------------------------------------------- log-probability

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape,layout", [((1, 1, 1, 1), "contiguous"), ((2, 3, 5, 7), "channels_last"),
                                          ((3, 4, 3, 6), "sliced")])
def test_logprob_and_gradient_match_reference(dtype, granularity, shape, layout):
    x, mean, std = latents(shape, dtype, layout)
    m = mean.detach().clone().requires_grad_(True)
    got = T.gaussian_logprob(x, m, std, granularity)
    m_ref = mean.detach().clone().requires_grad_(True)
    want = ref.gaussian_logprob(x, m_ref, std, granularity)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(want)
    (g,) = torch.autograd.grad(got, m, grad_out)
    (g_ref,) = torch.autograd.grad(want, m_ref, grad_out)
    assert_grad_close(g, g_ref, dtype)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_logprob_across_many_blocks_and_programs(small_tiles, granularity):
    x, mean, std = latents((3, 3, 6, 7), torch.float32)
    m = mean.clone().requires_grad_(True)
    got = T.gaussian_logprob(x, m, std, granularity)
    torch.testing.assert_close(got, ref.gaussian_logprob(x, mean, std, granularity), atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), m)
    m_ref = mean.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref.gaussian_logprob(x, m_ref, std, granularity).sum(), m_ref)
    assert_grad_close(g, g_ref, torch.float32)


# ---------------------------------------------------------------- reward pooling

@pytest.mark.parametrize("size,latent", [((16, 16), (4, 4)), ((17, 23), (5, 7)), ((4, 4), (6, 6)), ((3, 9), (3, 9)),
                                         ((1, 1), (1, 1))])
@pytest.mark.parametrize("weighted", [False, True])
def test_reward_pooling_matches_reference(size, latent, weighted):
    reward = torch.randn(2, *size, device=DEVICE)
    weight = None
    if weighted:
        weight = torch.rand(2, *size, device=DEVICE)
        weight[weight < 0.3] = 0.0
        weight[1] = 0.0
    r, w = T.reward_to_latent(reward, weight, *latent)
    r_ref, w_ref = ref.reward_to_latent(reward, weight, *latent)
    torch.testing.assert_close(r, r_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    if weighted:
        assert torch.all(r[1] == 0) and torch.all(w[1] == 0)


# ---------------------------------------------------------------- the fused loss

@pytest.mark.parametrize("loss_type", [PPO, SF])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_loss_matches_reference(granularity, dtype, loss_type):
    args = loss_inputs((3, 4, 5, 7), dtype, granularity) + (0.2, granularity, loss_type)
    stats = assert_loss_matches_reference(args)
    if loss_type == PPO and granularity != MEAN:
        assert 0 < stats[1] < 1  # the inputs put units on both sides of the clip


@pytest.mark.parametrize("granularity", [ELEMENT, PIXEL])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_loss_with_strided_latents(granularity, layout):
    args = loss_inputs((2, 3, 4, 5), torch.float16, granularity, layout) + (0.2, granularity, PPO)
    assert not args[0].is_contiguous()
    assert_loss_matches_reference(args)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 4, 1, 3)])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_loss_on_tiny_latents(shape, granularity):
    assert_loss_matches_reference(loss_inputs(shape, torch.float32, granularity) + (0.2, granularity, PPO))


@pytest.mark.parametrize("per_element_adv", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_element_granularity_advantages_and_weights(per_element_adv, weights):
    args = loss_inputs((2, 4, 3, 5), torch.float32, ELEMENT, per_element_adv=per_element_adv, weights=weights)
    assert_loss_matches_reference(args + (0.2, ELEMENT, PPO))


@pytest.mark.parametrize("loss_type", [PPO, SF])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_loss_across_many_blocks_and_programs(small_tiles, granularity, loss_type):
    """21 pixel blocks per image shared by 6 programs: per-image sums and partials cross programs."""
    args = loss_inputs((3, 3, 6, 7), torch.bfloat16, granularity) + (0.2, granularity, loss_type)
    assert launch.tile_shape(3, 6 * 7) == (4, 2)
    assert_loss_matches_reference(args)


def test_all_zero_weights_give_zeros_not_nan():
    x, mean, std, logp_old, adv, _ = loss_inputs((2, 4, 3, 3), torch.float32, PIXEL)
    weight = torch.zeros(2, 3, 3, device=DEVICE)
    loss, grad, stats = T.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.2, PIXEL, PPO)
    assert loss.item() == 0.0 and torch.all(grad == 0) and torch.all(stats == 0)


@triton.jit
def _exp_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.exp(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def _logp_old_at_ratio(logp: float, target: float) -> float:
    """A float32 ``logp_old`` with ``tl.exp(logp - logp_old) == target`` exactly, as the kernels compute the ratio.

    exp is not correctly rounded everywhere (numpy's float32 exp, which the interpreter uses,
    never returns 1.25 near log 1.25), so ``logp_old`` is searched in steps finer than the
    log-ratio's ulp; ``logp`` and ``logp_old`` near 0 keep float32 fine enough to hit.
    """
    steps = torch.arange(-256, 257, dtype=torch.float64, device=DEVICE) * 2.0**-27  # ~ulp(logp) / 2
    logp_old = (logp - math.log(target) + steps).to(torch.float32)
    delta = torch.tensor(logp, dtype=torch.float32, device=DEVICE) - logp_old
    ratio = torch.empty_like(delta)
    _exp_kernel[(1,)](delta, ratio, delta.numel(), BLOCK=triton.next_power_of_2(delta.numel()))
    hits = (ratio == target).nonzero()
    assert hits.numel() > 0, f"no float32 log-ratio near log({target}) that tl.exp maps exactly to {target}"
    return logp_old[hits[0, 0]].item()


@pytest.mark.parametrize("granularity,channels", [(ELEMENT, 2), (PIXEL, 1)])
def test_ratio_exactly_at_the_clip_boundary_is_unclipped(granularity, channels):
    """Ratios exactly 1 +- eps count as unclipped and pass their whole gradient (SPEC §5).

    The kernel's own log-prob and exp set the ratios exactly on the boundary (the reference's
    exp may round differently there), so the check is internal: clipfrac is 0 and the PPO
    gradient is the score-function gradient times the ratio, for both signs of the advantage.
    """
    eps = 0.125  # 1 +- eps exact in float32 and reachable by the interpreter's exp
    b, h, w = 4, 2, 3
    std = torch.full((b,), 0.4, device=DEVICE)  # log-prob near 0, so logp_old is too
    mean = torch.zeros(b, channels, h, w, device=DEVICE)
    x = mean + 0.1 * std.view(-1, 1, 1, 1)
    logp = T.gaussian_logprob(x, mean, std, granularity)
    value = logp.flatten()[0].item()
    assert torch.all(logp == value)
    targets = torch.tensor([1.0 + eps, 1.0 - eps, 1.0 + eps, 1.0 - eps], device=DEVICE)
    logp_old = torch.stack([torch.full_like(logp[0], _logp_old_at_ratio(value, t)) for t in targets.tolist()])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], device=DEVICE).view(-1, 1, 1).expand(b, h, w).contiguous()
    _, grad_ppo, stats = T.pxpo_loss_and_grad(x, mean, std, logp_old, adv, None, eps, granularity, PPO)
    _, grad_sf, _ = T.pxpo_loss_and_grad(x, mean, std, logp_old, adv, None, eps, granularity, SF)
    assert stats[1].item() == 0.0
    assert torch.all(grad_ppo != 0)
    torch.testing.assert_close(grad_ppo, grad_sf * targets.view(-1, 1, 1, 1), atol=0, rtol=1e-6)


def test_strictly_clipped_units_get_no_gradient():
    b, c, h, w = 2, 2, 2, 2
    mean = torch.zeros(b, c, h, w, device=DEVICE)
    x = mean + 0.5
    std = torch.ones(b, device=DEVICE)
    logp = ref.gaussian_logprob(x, mean, std, PIXEL)
    logp_old = logp - torch.log(torch.tensor([1.5, 0.5], device=DEVICE)).view(-1, 1, 1)
    adv = torch.tensor([1.0, -1.0], device=DEVICE).view(-1, 1, 1).expand(b, h, w).contiguous()
    _, grad, stats = T.pxpo_loss_and_grad(x, mean, std, logp_old, adv, None, 0.2, PIXEL, PPO)
    assert torch.all(grad == 0) and stats[1].item() == 1.0


def test_autograd_backward_scales_the_fused_gradient():
    args = loss_inputs((2, 4, 3, 5), torch.float32, PIXEL)
    x, mean, std, logp_old, adv, weight = args
    m = mean.clone().requires_grad_(True)
    loss, stats = T.pxpo_loss(x, m, std, logp_old, adv, weight, 0.2, PIXEL, PPO)
    assert not stats.requires_grad
    (3.0 * loss).backward()
    _, grad, _ = T.pxpo_loss_and_grad(*args, 0.2, PIXEL, PPO)
    torch.testing.assert_close(m.grad, 3.0 * grad)


def test_float64_goes_to_the_reference():
    args = loss_inputs((2, 2, 3, 3), torch.float64, PIXEL) + (0.2, PIXEL, PPO)
    for got, want in zip(T.pxpo_loss_and_grad(*args), ref.pxpo_loss_and_grad(*args)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_public_ops_dispatch_to_triton():
    import pxpo_ext

    x, mean, std, logp_old, adv, weight = loss_inputs((2, 4, 3, 3), torch.float32, PIXEL)
    with pxpo_ext.use_backend("triton"):
        loss, grad, stats = pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.2)
    want_loss, want_grad, _ = ref.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.2, PIXEL, PPO)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert_grad_close(grad, want_grad, torch.float32)


# ---------------------------------------------------------------- torch.library and torch.compile

def _op_samples():
    x, mean, std, logp_old, adv, weight = loss_inputs((2, 3, 3, 4), torch.float32, PIXEL)
    ops = torch.ops.pxpo_triton
    return [
        (ops.gaussian_logprob.default, (x, mean.clone().requires_grad_(True), std, PIXEL)),
        (ops.gaussian_logprob_backward.default, (x, mean, std, torch.randn(2, 3, 4, device=DEVICE), PIXEL)),
        (ops.reward_to_latent.default, (torch.randn(2, 7, 9, device=DEVICE), torch.rand(2, 7, 9, device=DEVICE), 3, 4)),
        (ops.reward_to_latent.default, (torch.randn(2, 8, 8, device=DEVICE), None, 2, 2)),
        (ops.pxpo_loss.default, (x, mean.clone().requires_grad_(True), std, logp_old, adv, weight, 0.2, PIXEL, PPO)),
        (ops.pxpo_loss_and_grad.default, (x, mean, std, logp_old, adv, weight, 0.2, PIXEL, PPO)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    """No graph break; under the interpreter the ops stay whole in the graph (see docs/triton.md)."""
    args = loss_inputs((2, 4, 3, 5), torch.float32, PIXEL)
    x, mean, std, logp_old, adv, weight = args

    def step(m):
        loss, stats = T.pxpo_loss(x, m, std, logp_old, adv, weight, 0.2, PIXEL, PPO)
        lp = T.gaussian_logprob(x, m, std, PIXEL)
        return loss + 1e-3 * lp.mean(), stats

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    m1 = mean.clone().requires_grad_(True)
    out1, stats1 = compiled(m1)
    out1.backward()
    m2 = mean.clone().requires_grad_(True)
    out2, stats2 = step(m2)
    out2.backward()
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(stats1, stats2)
    torch.testing.assert_close(m1.grad, m2.grad)


def _run_python(args, drop=()):
    """Run ``python *args`` in a fresh process with this checkout importable and ``drop`` unset."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for name in drop:
        env.pop(name, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_import_without_triton_reports_the_reason():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import pxpo_ext\n"
        "from pxpo_ext import _backend\n"
        "assert not _backend.available('triton')\n"
        "print(_backend.info()['triton'])\n"
    )
    out = _run_python(["-c", code], drop=("PXPO_BACKEND",))
    assert out.returncode == 0, out.stderr
    assert "needs the triton package" in out.stdout and "pip install triton" in out.stdout


def test_kernels_compile_for_a_gpu():
    """The interpreter never lowers the kernels; compile one variant of each for sm_90 with triton's ptxas."""
    pytest.importorskip("triton.backends.nvidia", reason="triton was built without its NVIDIA backend")
    out = _run_python(["-m", "pxpo_ext.triton_kernels.aot_check", "--quick"], drop=("TRITON_INTERPRET",))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernel variants compile for sm_90" in out.stdout
