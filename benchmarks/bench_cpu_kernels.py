"""Time the ``cpu`` backend's kernels against the eager reference, in the same run (docs/build.md, "CPU speed").

B=16, C=4, 64x64 latents, PPO, random weights; for every row and thread count the reference and the native
kernel are timed alternately (so a change in the machine's load hits both) and the best of ``--runs`` is
reported in milliseconds. The loss rows time ``pxpo_loss_and_grad`` against the reference's autograd forward
and backward (``reference.pxpo_loss_and_grad``); the log-prob rows time the forward alone. After the
table, the pooling's memory floor: both of its input maps read once (``torch.sum`` of each).

    PXPO_REQUIRE_NATIVE=1 python benchmarks/bench_cpu_kernels.py --threads 1 2
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from pxpo_ext import _native
from pxpo_ext import reference as ref

B, C, H, W, IMG = 16, 4, 64, 64, 512
NAMES = {ref.ELEMENT: "element", ref.PIXEL: "pixel", ref.MEAN: "mean (DDPO)"}


def loss_case(gran: int, dtype):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(B, C, H, W, generator=g).to(dtype)
    std = 0.1 + torch.rand(B, generator=g)
    x = (mean.float() + std.view(-1, 1, 1, 1) * torch.randn(B, C, H, W, generator=g)).to(dtype)
    lp = ref.gaussian_logprob(x, mean, std, gran)
    logp_old = lp + 0.05 * torch.randn(lp.shape, generator=g)
    adv = torch.randn(B, generator=g) if gran == ref.MEAN else torch.randn(B, H, W, generator=g)
    weight = None if gran == ref.MEAN else torch.rand(B, H, W, generator=g)
    args = (x, mean, std, logp_old, adv, weight, 0.2, gran, ref.PPO)
    return (lambda: ref.pxpo_loss_and_grad(*args)), (lambda: _native.pxpo_loss_and_grad(*args))


def logprob_case(gran: int):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(B, C, H, W, generator=g)
    std = 0.1 + torch.rand(B, generator=g)
    x = mean + std.view(-1, 1, 1, 1) * torch.randn(B, C, H, W, generator=g)
    return (lambda: ref.gaussian_logprob(x, mean, std, gran)), (lambda: _native.gaussian_logprob(x, mean, std, gran))


def pool_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, IMG, IMG, generator=g), torch.rand(B, IMG, IMG, generator=g)


def pool_case():
    reward, weight = pool_inputs()
    return (lambda: ref.reward_to_latent(reward, weight, H, W)), (lambda: _native.reward_to_latent(reward, weight, H, W))


def pool_floor_ms(runs: int) -> float:
    """The pooling's memory floor: both inputs read once (``torch.sum`` of each), best of ``runs``."""
    reward, weight = pool_inputs()
    best = float("inf")
    for _ in range(runs + 2):
        t0 = time.perf_counter()
        reward.sum(), weight.sum()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def rows():
    for dtype, dname in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        for gran in (ref.PIXEL, ref.ELEMENT, ref.MEAN):
            yield f"loss and grad, {NAMES[gran]}, {dname}", *loss_case(gran, dtype)
    for gran in (ref.PIXEL, ref.ELEMENT, ref.MEAN):
        yield f"log-prob, {NAMES[gran].split()[0]}, float32", *logprob_case(gran)
    yield f"reward_to_latent, {IMG}x{IMG} to {H}x{W}, weighted", *pool_case()


def best_pair_ms(f_ref, f_cpu, runs: int) -> tuple[float, float]:
    with torch.no_grad():
        for f in (f_ref, f_cpu, f_ref, f_cpu):  # warm-up
            f()
    best = [float("inf"), float("inf")]
    for _ in range(runs):
        for i, f in enumerate((f_ref, f_cpu)):
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] * 1e3, best[1] * 1e3


def fmt(ms: float) -> str:
    return f"{ms:.3g}" if ms < 10 else f"{ms:.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--only", default=None, help="substring of the row names to time")
    args = p.parse_args()
    _native.load()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    head = " | ".join(f"reference, {n} thread{'s' * (n > 1)} | cpu, {n} thread{'s' * (n > 1)} | speed-up"
                      for n in args.threads)
    print(f"| op, granularity, dtype | {head} |")
    print("| --- |" + " ---: | ---: | ---: |" * len(args.threads))
    pooled = False
    for name, f_ref, f_cpu in rows():
        if args.only and args.only not in name:
            continue
        pooled |= name.startswith("reward_to_latent")
        cells = []
        for n in args.threads:
            torch.set_num_threads(n)
            r, c = best_pair_ms(f_ref, f_cpu, args.runs)
            cells += [fmt(r), fmt(c), f"{r / c:.2g}x" if r / c < 10 else f"{r / c:.0f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if pooled:
        floors = []
        for n in args.threads:
            torch.set_num_threads(n)
            floors.append(f"{fmt(pool_floor_ms(args.runs))} ms at {n} thread{'s' * (n > 1)}")
        print("reward_to_latent's floor, both inputs read once (torch.sum of each): " + ", ".join(floors))
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
