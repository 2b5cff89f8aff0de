"""Property-based tests: every CPU-runnable backend against the reference on random shapes, dtypes, strides,
scales, clip ranges and weights with zeros.

CI runs a small number of cases per op and backend; the dedicated run sets ``PXPO_FUZZ_EXAMPLES``::

    PXPO_FUZZ_EXAMPLES=10000 python -m pytest tests/test_fuzz.py -q -p no:cacheprovider

Tolerances: kernels and reference compute in float32 from the same (possibly half-precision) inputs, so
losses and statistics agree to ``1e-5`` absolute plus ``1e-4`` relative, and gradients (in the input dtype)
to the dtype's rounding (:data:`conftest.TOL`) relative to the largest gradient. Cases where a ratio lies
within ``1e-4`` of a clip boundary are discarded: there the side of the clip depends on float rounding.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pxpo_ext
from pxpo_ext import reference as ref
from pxpo_ext.reference import ELEMENT, GRANULARITIES, LOSS_TYPES, MEAN

from conftest import TOL

EXAMPLES = int(os.environ.get("PXPO_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def latents(draw):
    b, c = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    h, w = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    dtype = draw(DTYPES)
    scale = draw(st.sampled_from([1e-2, 0.3, 1.0, 10.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "transposed"]))
    g = torch.Generator().manual_seed(seed)
    mean = (scale * torch.randn(b, c, h, w, generator=g)).to(dtype)
    std = scale * (0.2 + torch.rand(b, generator=g))
    x = (mean.float() + std.view(-1, 1, 1, 1) * torch.randn(b, c, h, w, generator=g)).to(dtype)
    if layout == "channels_last":
        x, mean = x.contiguous(memory_format=torch.channels_last), mean.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x, mean = x.transpose(2, 3).contiguous().transpose(2, 3), mean.transpose(2, 3).contiguous().transpose(2, 3)
    return x, mean, std, g


@pytest.fixture
def cpu_backend(backend, device):
    if device != "cpu":
        pytest.skip("the fuzz run covers the backends that run on the CPU")
    return backend


@given(data=latents(), granularity=st.sampled_from(sorted(GRANULARITIES)))
@FUZZ
def test_fuzz_gaussian_logprob(cpu_backend, data, granularity):
    x, mean, std, _ = data
    gran = GRANULARITIES[granularity]
    m = mean.detach().clone().requires_grad_(True)
    got = pxpo_ext.gaussian_logprob(x, m, std, granularity)
    want = ref.gaussian_logprob(x, mean, std, gran)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    grad_out = torch.randn_like(got)
    (g_got,) = torch.autograd.grad(got, m, grad_out)
    m_ref = mean.detach().clone().requires_grad_(True)
    (g_want,) = torch.autograd.grad(ref.gaussian_logprob(x, m_ref, std, gran), m_ref, grad_out)
    atol, rtol = TOL[mean.dtype]
    torch.testing.assert_close(g_got, g_want, atol=atol * float(g_want.abs().max()) + 1e-30, rtol=rtol)


@given(b=st.integers(1, 3), size=st.tuples(st.integers(1, 40), st.integers(1, 40)),
       latent=st.tuples(st.integers(1, 12), st.integers(1, 12)), weighted=st.booleans(), seed=st.integers(0, 2**31 - 1))
@FUZZ
def test_fuzz_reward_to_latent(cpu_backend, b, size, latent, weighted, seed):
    assume(latent[0] <= size[0] and latent[1] <= size[1])
    g = torch.Generator().manual_seed(seed)
    reward = 3 * torch.randn(b, *size, generator=g)
    weight = None
    if weighted:
        weight = torch.rand(b, *size, generator=g)
        weight[weight < 0.4] = 0
    r, w = pxpo_ext.reward_to_latent(reward, latent, weight)
    r_ref, w_ref = ref.reward_to_latent(reward, weight, *latent)
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)


@given(data=latents(), granularity=st.sampled_from(sorted(GRANULARITIES)), loss_type=st.sampled_from(sorted(LOSS_TYPES)),
       clip=st.sampled_from([1e-3, 0.05, 0.2, 1.0]), spread=st.sampled_from([0.0, 0.01, 0.3]),
       weights=st.sampled_from(["none", "random", "zeros_in_one_image"]), per_element_adv=st.booleans())
@FUZZ
def test_fuzz_pxpo_loss(cpu_backend, data, granularity, loss_type, clip, spread, weights, per_element_adv):
    x, mean, std, g = data
    gran = GRANULARITIES[granularity]
    b, c, h, w = x.shape
    logp = ref.gaussian_logprob(x, mean, std, gran)
    logp_old = logp + spread * torch.randn(logp.shape, generator=g)
    if gran == MEAN:
        adv_shape = (b,)
    elif gran == ELEMENT and per_element_adv:
        adv_shape = (b, c, h, w)
    else:
        adv_shape = (b, h, w)
    adv = torch.randn(adv_shape, generator=g)
    weight = None
    if gran != MEAN and weights != "none":
        weight = torch.rand(b, h, w, generator=g)
        weight[weight < 0.3] = 0
        if weights == "zeros_in_one_image":
            weight[0] = 0
    ratio = torch.exp(logp - logp_old)
    for bound in (1 - clip, 1 + clip):  # rounding decides the side of the clip there
        assume(not bool(((ratio - bound).abs() < 1e-4).any()))
    kind = LOSS_TYPES[loss_type]
    m_ref = mean.detach().clone().requires_grad_(True)
    want_loss, want_stats = ref.pxpo_loss(x, m_ref, std, logp_old, adv, weight, clip, gran, kind)
    want_loss.backward()
    m = mean.detach().clone().requires_grad_(True)
    loss, stats = pxpo_ext.pxpo_loss(x, m, std, logp_old, adv, weight, clip, granularity, loss_type)
    loss.backward()
    torch.testing.assert_close(loss, want_loss.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack([stats["approx_kl"], stats["clipfrac"], stats["skipped"]]), want_stats,
                               atol=1e-5, rtol=1e-4)
    atol, rtol = TOL[mean.dtype]
    torch.testing.assert_close(m.grad, m_ref.grad, atol=atol * float(m_ref.grad.abs().max()) + 1e-30, rtol=rtol)
