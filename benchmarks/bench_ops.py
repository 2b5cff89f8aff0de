"""Benchmark the pxpo ops on every backend that runs here, against the eager reference and torch.compile of it.

For each op (the fused loss forward+backward, the loss-and-gradient fast path, the log-prob forward+backward,
the reward pooling) at Stable Diffusion 1.5 latent shapes B x 4 x 64 x 64, it reports the wall time per call
(what a caller waits for) and, on a GPU, the GPU busy time per call (the sum of the kernels' durations from the
profiler) and the number of kernels launched; plus the floor: the bytes the op must move (inputs read once,
gradient written once) over the measured device-to-device copy bandwidth. Rows go to a CSV with the device,
versions and date.

    python benchmarks/bench_ops.py --device cpu --batch 16 --out benchmarks/results/ops_cpu.csv
    python benchmarks/bench_ops.py --device cuda --batch 16 128 1024 4096 --out benchmarks/results/ops_h100.csv
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import time

import torch

import pxpo_ext
from pxpo_ext import _backend
from pxpo_ext import reference as ref

C, H, W, IMG = 4, 64, 64, 512


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_us(fn, device: str, min_time: float = 0.3, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    reps, times = 1, []
    while True:  # calibrate a rep count that runs ~min_time/5, then take the median of 5 repeats
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        el = time.perf_counter() - t0
        if el > min_time / 5 or reps > 10000:
            break
        reps *= 2
    times.append(el / reps)
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times) * 1e6


def gpu_busy_us(fn, iters: int = 20) -> tuple[float, float, dict[str, float]]:
    """Kernel time per call, kernels per call and each kernel's time per call, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in events)
    per_kernel: dict[str, float] = {}
    for e in events:
        per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.device_time / iters
    return busy / iters, len(events) / iters, per_kernel


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    n = (1 << 28) if device == "cuda" else (1 << 25)
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    us = wall_us(lambda: b.copy_(a), device)
    return 2 * a.numel() * 4 / (us * 1e-6)


def make_inputs(batch: int, dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    mean = torch.randn(batch, C, H, W, device=device, generator=g).to(dtype)
    std = 0.1 + torch.rand(batch, device=device, generator=g)
    x = (mean.float() + std.view(-1, 1, 1, 1) * torch.randn(batch, C, H, W, device=device, generator=g)).to(dtype)
    logp = ref.gaussian_logprob(x, mean, std, ref.PIXEL)
    logp_old = logp + 0.05 * torch.randn(logp.shape, device=device, generator=g)
    adv = torch.randn(batch, H, W, device=device, generator=g)
    weight = torch.rand(batch, H, W, device=device, generator=g)
    reward = torch.randn(batch, IMG, IMG, device=device, generator=g)
    return x, mean, std, logp_old, adv, weight, reward


def cases(batch: int, dtype, device: str):
    """(op name, bytes the op must move, {provider: callable})."""
    x, mean, std, logp_old, adv, weight, reward = make_inputs(batch, dtype, device)
    n, px, es = x.numel(), adv.numel(), x.element_size()
    mean_req = mean.detach().clone().requires_grad_(True)

    def ref_loss_fwd_bwd():
        mean_req.grad = None
        loss, _ = ref.pxpo_loss(x, mean_req, std, logp_old, adv, weight, 0.2, ref.PIXEL, ref.PPO)
        loss.backward()

    compiled_ref = torch.compile(ref.pxpo_loss_and_grad)

    def api_loss_fwd_bwd():
        mean_req.grad = None
        loss, _ = pxpo_ext.pxpo_loss(x, mean_req, std, logp_old, adv, weight, 0.2)
        loss.backward()

    loss_bytes = 3 * n * es + 3 * px * 4  # x, mean read; grad written; logp_old, adv, weight read
    yield "pxpo_loss fwd+bwd", loss_bytes, {"eager reference": ref_loss_fwd_bwd,
                                            "compiled reference": lambda: compiled_ref(x, mean, std, logp_old, adv, weight, 0.2, ref.PIXEL, ref.PPO),
                                            "pxpo (autograd op)": api_loss_fwd_bwd,
                                            "pxpo (loss_and_grad)": lambda: pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, weight, 0.2)}
    # Without weights nothing per pixel is read for them, so the floor is lower.
    yield "pxpo_loss fwd+bwd unweighted", loss_bytes - px * 4, {
        "eager reference": lambda: ref.pxpo_loss_and_grad(x, mean, std, logp_old, adv, None, 0.2, ref.PIXEL, ref.PPO),
        "pxpo (loss_and_grad)": lambda: pxpo_ext.pxpo_loss_and_grad(x, mean, std, logp_old, adv, None, 0.2)}

    def ref_logprob():
        mean_req.grad = None
        ref.gaussian_logprob(x, mean_req, std, ref.PIXEL).sum().backward()

    def api_logprob():
        mean_req.grad = None
        pxpo_ext.gaussian_logprob(x, mean_req, std).sum().backward()

    yield "gaussian_logprob fwd+bwd", 3 * n * es + 2 * px * 4, {"eager reference": ref_logprob, "pxpo": api_logprob}
    img_weight = torch.rand(reward.shape, device=device)
    yield "reward_to_latent", reward.numel() * 4 + 2 * px * 4, {
        "eager reference": lambda: ref.reward_to_latent(reward, None, H, W),
        "pxpo": lambda: pxpo_ext.reward_to_latent(reward, (H, W))}
    yield "reward_to_latent weighted", 2 * reward.numel() * 4 + 2 * px * 4, {
        "eager reference": lambda: ref.reward_to_latent(reward, img_weight, H, W),
        "pxpo": lambda: pxpo_ext.reward_to_latent(reward, (H, W), img_weight)}

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backends", nargs="+", default=None, help="backends to time (default: all that run here)")
    p.add_argument("--out", default="benchmarks/results/ops.csv")
    p.add_argument("--kernels", action="store_true", help="also print each kernel's GPU time per call")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds each timing spends (5 medians of a fifth)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    device = args.device
    candidates = ["cuda", "triton", "torch"] if device == "cuda" else ["cpu", "torch"]
    backends = [b for b in (args.backends or candidates) if _backend.available(b)]
    bandwidth = copy_bandwidth(device)
    print(f"device: {device_name(device)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; backends {backends}")
    rows = []
    for batch in args.batch:
        for op, nbytes, providers in cases(batch, dtype, device):
            floor_us = nbytes / bandwidth * 1e6
            for provider, fn in providers.items():
                for backend in (backends if provider.startswith("pxpo") else [None]):
                    with pxpo_ext.use_backend(backend):
                        try:
                            us = wall_us(fn, device, min_time=args.min_time)
                        except Exception as e:  # a provider that cannot run here (e.g. inductor without a compiler)
                            print(f"  {op} {provider} {backend}: skipped ({type(e).__name__}: {str(e)[:120]})")
                            continue
                        busy, launches, per_kernel = (gpu_busy_us(fn) if device == "cuda"
                                                      else (float("nan"), float("nan"), {}))
                    label = provider if backend is None else f"{provider} [{backend}]"
                    row = dict(date=dt.date.today().isoformat(), device=device_name(device), torch=torch.__version__,
                               dtype=args.dtype, op=op, provider=label, batch=batch, wall_us=round(us, 2),
                               gpu_busy_us=round(busy, 2), kernels_per_call=launches, floor_us=round(floor_us, 2),
                               bytes=nbytes, pct_of_floor=round(100 * floor_us / us, 1))
                    rows.append(row)
                    print(f"  B={batch:5d} {op:26s} {label:34s} wall {us:10.1f} us  busy {busy:8.1f} us  floor {floor_us:8.1f} us")
                    if args.kernels:
                        for name, kernel_us in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
                            print(f"      {kernel_us:8.2f} us  {name[:110]}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    new = not os.path.exists(args.out)
    with open(args.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
