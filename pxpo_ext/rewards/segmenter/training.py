"""Training of the shape segmenter that pxpo ships for its embedded model (the ``remove_circles``
reward), and its command line (``python/train_segmenter.py`` calls :func:`main`).

The data are scenes from :class:`pxpo_ext.scenes.SceneGenerator` with their ground-truth
label maps (background, circle, square, triangle, star). Scenes are warped and degraded on
the fly (stretch, rotation, shear, blur, noise, colour shifts, flips) because the reward will
see a diffusion model's imperfect renditions, not clean scenes. The held-out score is the
per-class IoU on scenes from a generator seed never used in training (clean, degraded, and
warped + degraded); it is stored in the weights' metadata and printed.

    python python/train_segmenter.py                 # 5 to 11 minutes on a shared 2-core CPU, no GPU
    python python/train_segmenter.py --steps 50 --out /tmp/seg.safetensors   # smoke run
    python python/train_segmenter.py --judge-agreement   # shipped weights vs the judge on the embedded model

``--judge-agreement`` trains nothing: it renders every one-circle scene caption with the
embedded model (or ``--model``) and prints the IoU between the pixels the segmenter calls
circle and the circle regions :mod:`pxpo_ext.judge` finds in the same images.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ...scenes import SceneGenerator
from . import CLASSES, INPUT_SIZE, WEIGHTS, ShapeSegmenter, save_segmenter

EVAL_SEED_OFFSET = 1_000_003  # held-out scenes come from a generator seed the training never uses


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_segmenter.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1200, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=16, help="scenes per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (cosine decay)")
    p.add_argument("--width", type=int, default=16, help="channels of the first level (weights ~ width^2)")
    p.add_argument("--train-scenes", type=int, default=6000, help="distinct training scenes (augmented every step)")
    p.add_argument("--eval-scenes", type=int, default=500, help="held-out scenes for the IoU")
    p.add_argument("--seed", type=int, default=0, help="scene generator and initialisation seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (one is fastest on a shared, oversubscribed CPU)")
    p.add_argument("--out", type=Path, default=WEIGHTS, help="safetensors file to write (or to read, with --judge-agreement)")
    p.add_argument("--judge-agreement", action="store_true", help="measure --out against the judge instead of training")
    p.add_argument("--model", default=None, help="with --judge-agreement: a diffusers folder (default: the embedded model)")
    return p.parse_args(argv)


def scene_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes at the segmenter's input size: images ``(n, 3, S, S)`` and labels ``(n, S, S)``."""
    scenes = SceneGenerator(image_size=INPUT_SIZE, seed=seed).generate(n)
    return scenes.images, torch.stack([s.label_map() for s in scenes.scenes])


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (separable 5-tap kernel; sigma 0 leaves it unchanged)."""
    offsets = torch.arange(-2, 3, dtype=images.dtype)
    kernel = torch.exp(-offsets**2 / (2 * sigma.clamp_min(1e-3).view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, 5)
    b, c, h, w = images.shape
    x = images.reshape(1, b * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(b * c, 1, 1, 5), groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(b * c, 1, 5, 1), groups=b * c)
    return x.reshape(b, c, h, w)


def degrade(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random blur, noise and colour gain/offset, like a small diffusion model's output."""
    b = images.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)
    x = _gaussian_blur(images, strength * 1.2 * rand(b))
    gain = 1 + strength * 0.2 * (2 * rand(b, 3, 1, 1) - 1)
    offset = strength * 0.08 * (2 * rand(b, 3, 1, 1) - 1)
    x = x * gain + offset
    x = x + strength * 0.05 * rand(b, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def distort(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, strength: float = 1.0):
    """A random affine warp per scene (stretch, rotation, shear), as a diffusion model draws imperfect shapes.

    Images are resampled bilinearly and labels by nearest neighbour, with the border extended.
    """
    b = images.shape[0]
    rand = lambda *shape: 2 * torch.rand(*shape, generator=generator) - 1
    angle = strength * math.radians(15) * rand(b)
    scale = 1 + strength * 0.15 * rand(b, 2)
    shear = strength * 0.15 * rand(b)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale[:, 0], -sin / scale[:, 0] + shear
    theta[:, 1, 0], theta[:, 1, 1] = sin / scale[:, 1], cos / scale[:, 1]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped_labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="border",
                                  align_corners=False)
    return warped, warped_labels[:, 0].long()


def iou_per_class(model: ShapeSegmenter, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Intersection over union of each class, summed over all images, and the pixel accuracy."""
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in images.split(100)])
    out = {}
    for k, name in enumerate(CLASSES):
        inter = ((pred == k) & (labels == k)).sum().item()
        union = ((pred == k) | (labels == k)).sum().item()
        out[name] = inter / union if union else float("nan")
    out["mean_shape_iou"] = sum(out[n] for n in CLASSES[1:]) / (len(CLASSES) - 1)
    out["pixel_accuracy"] = (pred == labels).float().mean().item()
    return {k: round(v, 4) for k, v in out.items()}


def judge_agreement(weights: Path, model: str | None = None, seed: int = 0) -> dict:
    """IoU of the segmenter's circle pixels with the judge's circle regions on generated images."""
    from ... import embedded
    from ...judge import detect_objects
    from ...scenes import prompts
    from .. import get_reward

    pipe = embedded.load_pipeline(path=model)
    captions = [c for c in prompts(max_objects=1) if "circle" in c]
    images = pipe(captions, num_inference_steps=embedded.NUM_INFERENCE_STEPS, guidance_scale=embedded.GUIDANCE_SCALE,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images.float().clamp(0, 1)
    segmented = get_reward("remove_circles", weights_path=str(weights))(images, captions, [{}] * len(captions)) < -0.5
    inter = union = with_circle = 0
    for image, mine in zip(images, segmented):
        circles = [o["mask"] for o in detect_objects(image) if o["shape"] == "circle"]
        judged = torch.stack(circles).any(0) if circles else torch.zeros_like(mine)
        with_circle += bool(circles)
        inter += (judged & mine).sum().item()
        union += (judged | mine).sum().item()
    return {"images": len(captions), "judge_found_a_circle": with_circle,
            "iou_with_judge": round(inter / union, 4) if union else float("nan"),
            "segmented_circle_fraction": round(segmented.float().mean().item(), 4)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.judge_agreement:
        result = judge_agreement(args.out, args.model, args.seed)
        print(json.dumps(result))
        return result
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = scene_batch(args.train_scenes, args.seed)
    eval_x, eval_y = scene_batch(args.eval_scenes, args.seed + EVAL_SEED_OFFSET)
    eval_degraded = degrade(eval_x, torch.Generator().manual_seed(args.seed + 1))
    eval_distorted_x, eval_distorted_y = distort(eval_x, eval_y, torch.Generator().manual_seed(args.seed + 2))
    eval_distorted_x = degrade(eval_distorted_x, torch.Generator().manual_seed(args.seed + 3))

    model = ShapeSegmenter(args.width)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    start = time.time()
    for step in range(args.steps):
        index = torch.randint(len(train_x), (args.batch_size,), generator=generator)
        x, y = train_x[index], train_y[index]
        flip = torch.rand(args.batch_size, generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
        x, y = distort(x, y, generator, strength=float(torch.rand(1, generator=generator)))
        x = degrade(x, generator, strength=float(torch.rand(1, generator=generator)))
        loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)

    model.eval()
    metrics = {
        "held_out_scenes": args.eval_scenes,
        "clean": iou_per_class(model, eval_x, eval_y),
        "degraded": iou_per_class(model, eval_degraded, eval_y),
        "distorted": iou_per_class(model, eval_distorted_x, eval_distorted_y),
        "train_steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds": round(time.time() - start, 1),
    }
    save_segmenter(model, args.out, metrics)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return metrics
