"""Numerical guards of the PXPO loss (issue #9) on every backend, and device mismatches named before any kernel.

A unit (element, pixel or image) whose log-ratio ``logp - logp_old`` is NaN, infinite or larger in size
than ``reference.LOG_RATIO_LIMIT`` is skipped: it adds nothing to the loss, the gradient, ``approx_kl`` or
``clipfrac`` (the per-image weight sums keep it) and ``stats["skipped"]`` counts it. So the loss of the
corrupted inputs must equal the plain loss of clean inputs in which each bad unit is on-policy with a zero
advantage: that unit then adds exactly nothing either. The "cuda" parameter runs on a GPU machine; Triton
runs under its interpreter here.
"""
import pytest
import torch

import pxpo_ext
from pxpo_ext import reference as ref
from pxpo_ext.reference import ELEMENT, LOG_RATIO_LIMIT, MEAN, PIXEL

from conftest import HAS_CUDA, TOL

# Triton's interpreter (numpy) warns about the NaN and inf it computes before the guard's selects drop them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

GRANS = {"element": ELEMENT, "pixel": PIXEL, "mean": MEAN}
CORRUPTIONS = ["huge_log_ratio", "nan_mean", "inf_mean", "nan_logp_old", "tiny_std"]
SHAPE = (3, 4, 4, 5)


def clean_inputs(dtype, device, granularity, shape=SHAPE):
    b, _, h, w = shape
    mean = torch.randn(shape, device=device).to(dtype)
    std = 0.3 + torch.rand(b, device=device)
    x = (mean.float() + std.view(-1, 1, 1, 1) * torch.randn(shape, device=device)).to(dtype)
    logp = ref.gaussian_logprob(x, mean, std, GRANS[granularity])
    logp_old = logp + 0.1 * torch.randn_like(logp)
    # Per-element advantages for "element", so that one element's advantage can be zeroed.
    adv = torch.randn({"element": shape, "pixel": (b, h, w), "mean": (b,)}[granularity], device=device)
    weight = None if granularity == "mean" else torch.rand(b, h, w, device=device)
    return x, mean, std, logp_old, adv, weight


def corrupt(kind, x, mean, std, logp_old, granularity):
    """Corrupted ``(mean, std, logp_old)`` and the ``bad`` unit mask (in ``logp_old``'s shape)."""
    mean, std, logp_old = mean.clone(), std.clone(), logp_old.clone()
    bad = torch.zeros_like(logp_old, dtype=torch.bool)
    if granularity == "mean":
        bad[1] = True
    else:
        bad[0, ..., 1, 2] = True  # element: every channel of this pixel
        bad[2, ..., 3, 0] = True
        if granularity == "element":
            bad[1, 2, 0, 4] = True
    if kind == "tiny_std":  # 1 / sigma^2 overflows float32: every unit of image 0 gets lp = -inf
        bad[:] = False
        bad[0] = True
        std[0] = 1e-20
    elif kind == "huge_log_ratio":
        logp_old[bad] = torch.where(torch.arange(int(bad.sum()), device=x.device) % 2 == 0, -1e4, 1e4)
    elif kind == "nan_logp_old":
        logp_old[bad] = float("nan")
    else:  # one channel of the unit's mean overflowed, as an fp16 UNet can
        value = float("nan") if kind == "nan_mean" else float("inf")
        elems = bad.view(-1, 1, 1, 1).expand_as(mean) if granularity == "mean" else (
            bad.unsqueeze(1).expand_as(mean) if granularity == "pixel" else bad)
        first_channel = torch.zeros_like(elems)
        first_channel[:, 0 if granularity != "element" else slice(None)] = True
        mean[elems & first_channel] = value
    return mean, std, logp_old, bad


def neutralised(x, mean, std, logp_old, adv, bad, granularity):
    """The clean inputs with every bad unit on-policy and of zero advantage: a unit that adds nothing."""
    logp_old = torch.where(bad, ref.gaussian_logprob(x, mean, std, GRANS[granularity]), logp_old)
    adv = adv.masked_fill(bad, 0.0)
    return logp_old, adv


def assert_grad_close(got, want, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want.to(got.dtype), atol=atol * max(want.abs().max().item(), 1e-30), rtol=rtol)


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("loss_type", ["ppo", "sf"])
@pytest.mark.parametrize("granularity", list(GRANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bad_units_are_skipped_and_counted(backend, device, kind, loss_type, granularity, dtype):
    x, mean, std, logp_old, adv, weight = clean_inputs(dtype, device, granularity)
    bad_mean, bad_std, bad_logp_old, bad = corrupt(kind, x, mean, std, logp_old, granularity)
    clip = 0.05

    loss, grad, stats = pxpo_ext.pxpo_loss_and_grad(x, bad_mean, bad_std, bad_logp_old, adv, weight, clip,
                                                    granularity, loss_type)
    m = bad_mean.detach().clone().requires_grad_(True)
    loss_ag, stats_ag = pxpo_ext.pxpo_loss(x, m, bad_std, bad_logp_old, adv, weight, clip, granularity, loss_type)
    loss_ag.backward()

    for name, value in (("loss", loss), ("autograd loss", loss_ag), *stats.items(), *stats_ag.items()):
        assert value.dim() == 0 and value.device == x.device and torch.isfinite(value), (name, value)
    assert torch.isfinite(grad).all() and torch.isfinite(m.grad).all()
    assert stats["skipped"].item() == bad.sum().item() == stats_ag["skipped"].item()

    # The kept units agree with the plain (no unit skipped) loss of the neutralised clean inputs.
    ok_logp_old, ok_adv = neutralised(x, mean, std, logp_old, adv, bad, granularity)
    want_loss, want_grad, want_stats = ref.pxpo_loss_and_grad(x, mean, std, ok_logp_old, ok_adv, weight, clip,
                                                              GRANS[granularity], ref.LOSS_TYPES[loss_type])
    assert want_stats[2].item() == 0
    for got_loss, got_stats in ((loss, stats), (loss_ag, stats_ag)):
        torch.testing.assert_close(got_loss.detach(), want_loss, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_stats["approx_kl"], want_stats[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_stats["clipfrac"], want_stats[1], atol=1e-5, rtol=1e-4)
    assert_grad_close(grad, want_grad, dtype)
    assert_grad_close(m.grad, want_grad, dtype)
    bad_elems = {"element": bad, "pixel": bad.unsqueeze(1), "mean": bad.view(-1, 1, 1, 1)}[granularity]
    assert torch.all(grad.masked_select(bad_elems.expand_as(grad)) == 0)


@pytest.mark.parametrize("granularity", list(GRANS))
def test_log_ratio_limit_is_the_boundary(backend, device, granularity):
    """|d| just inside the limit is used (its huge ratio stays finite), just outside it is skipped."""
    x, mean, std, _, _, weight = clean_inputs(torch.float32, device, granularity, shape=(4, 4, 4, 5))
    logp = ref.gaussian_logprob(x, mean, std, GRANS[granularity])
    offsets = torch.tensor([LOG_RATIO_LIMIT - 0.5, -(LOG_RATIO_LIMIT - 0.5), LOG_RATIO_LIMIT + 0.5,
                            -(LOG_RATIO_LIMIT + 0.5)], device=device)
    d = torch.zeros_like(logp).flatten()
    d[:4] = offsets
    logp_old = logp - d.view_as(logp)
    adv = -torch.ones_like(logp if granularity != "element" else logp[:, 0])  # A < 0: the unclipped e^d term counts
    loss, grad, stats = pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.2, granularity)
    want_loss, want_grad, want_stats = ref.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.2,
                                                              GRANS[granularity], ref.PPO)
    assert stats["skipped"].item() == 2 == want_stats[2].item()
    assert torch.isfinite(loss) and loss.item() > 1e3  # the e^19.5 unit is in it
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack(list(stats.values())), want_stats, atol=1e-5, rtol=1e-4)
    assert_grad_close(grad, want_grad, torch.float32)


@pytest.mark.parametrize("other", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA,
                                                                                          reason="no CUDA device"))])
def test_mismatched_devices_name_the_argument_and_both_devices(other):
    x, mean, std, logp_old, adv, weight = clean_inputs(torch.float32, "cpu", "pixel")
    moved = torch.device(other if other == "meta" else "cuda:0")
    message = f"is on {moved} but the latents are on cpu; move them to the same device"
    for fn in (pxpo_ext.pxpo_loss, pxpo_ext.pxpo_loss_and_grad):
        with pytest.raises(ValueError, match="weight " + message):
            fn(x, mean, std, logp_old, adv, weight.to(other), 0.1)
        with pytest.raises(ValueError, match="logp_old " + message):
            fn(x, mean, std, logp_old.to(other), adv, weight, 0.1)
        with pytest.raises(ValueError, match="advantages " + message):
            fn(x, mean, std, logp_old, adv.to(other), weight, 0.1)
        with pytest.raises(ValueError, match="std " + message):
            fn(x, mean, std.to(other), logp_old, adv, weight, 0.1)
    reward = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match=f"weight is on {moved} but reward is on cpu; move them to the same device"):
        pxpo_ext.reward_to_latent(reward, 4, torch.rand(3, 8, 8, device=other))
