"""Fine-tune a diffusion model on a person's feedback about one image (``python python/feedback.py``).

Interactive: a local web page shows the image for a prompt and seed; paint liked (green) and
disliked (red) regions, submit, and pxpo trains a few epochs on that prompt and seed and
shows the new image; repeat, then save the LoRA.

    python python/feedback.py                                   # http://127.0.0.1:8765/
    python python/feedback.py --prompt "a red star on a white background" --seed 3

Non-interactive: the marks come from PNG masks (white = painted) of the image's size.

    python python/feedback.py --like-mask like.png --dislike-mask dislike.png --rounds 3

writes ``before.png``, ``after.png`` and the LoRA (``lora/``) under ``--output-dir``; use
``--write-image`` alone to get the image to paint masks on.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pxpo_ext.feedback import FeedbackServer, create_session
from pxpo_ext.rewards.human import mask_from_png

DEFAULT_PROMPT = "a blue circle on a yellow background"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt to give feedback on")
    p.add_argument("--seed", type=int, default=0, help="seed of the image's initial noise")
    p.add_argument("--model", default=None, help="diffusers folder or hub id (default: the embedded model)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/feedback"), help="where metrics and the LoRA go")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port to serve on (0: any free port)")
    p.add_argument("--epochs-per-round", type=int, default=2, help="PXPO epochs after each submission")
    p.add_argument("--sample-batch-size", type=int, default=4, help="samples of the prompt and seed per epoch")
    p.add_argument("--num-steps", type=int, default=10, help="DDIM steps per image")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="LoRA learning rate")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="KL penalty toward the initial model, which holds what you did not mark (train_kl_coef; 0: off)")
    p.add_argument("--like-mask", type=Path, help="PNG painted where the image is liked (non-interactive)")
    p.add_argument("--dislike-mask", type=Path, help="PNG painted where the image is disliked (non-interactive)")
    p.add_argument("--rounds", type=int, default=1, help="rounds on the PNG masks (non-interactive)")
    p.add_argument("--write-image", action="store_true", help="only write the image to paint on, then exit")
    args = p.parse_args(argv)
    for mask in (args.like_mask, args.dislike_mask):
        if mask is not None and not mask.is_file():
            p.error(f"mask {mask} does not exist")
    if args.rounds < 1 or args.epochs_per_round < 1:
        p.error("--rounds and --epochs-per-round must be at least 1")
    return args


def _write_png(session, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(session.png)
    print(f"wrote {path}")


def read_masks(args):
    """The PNG masks of the non-interactive route, read before the (slow) model load."""
    liked = mask_from_png(args.like_mask, f"--like-mask {args.like_mask}") if args.like_mask else None
    disliked = mask_from_png(args.dislike_mask, f"--dislike-mask {args.dislike_mask}") if args.dislike_mask else None
    return liked, disliked


def run_masks(session, liked, disliked, rounds: int, output_dir: Path) -> None:
    """The PNG-mask route: train ``rounds`` rounds on the same marks, write before/after and the LoRA."""
    session.check_marks(liked, disliked)  # fail on masks of the wrong size before any training
    _write_png(session, output_dir / "before.png")
    for _ in range(rounds):
        state = session.submit(liked, disliked, wait=True)
        if state["status"] == "error":
            raise SystemExit(f"feedback.py: {state['message']}")
        print(f"round {state['round']}: {json.dumps(state['last_metrics'])}")
    _write_png(session, output_dir / "after.png")
    print(f"saved the LoRA to {session.save()}")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    use_masks = args.like_mask is not None or args.dislike_mask is not None
    try:
        liked, disliked = read_masks(args) if use_masks else (None, None)
    except ValueError as error:
        raise SystemExit(f"feedback.py: {error}") from None
    session = create_session(
        args.prompt, args.seed, model=args.model, output_dir=args.output_dir,
        epochs_per_round=args.epochs_per_round, sample_batch_size=args.sample_batch_size,
        sample_num_steps=args.num_steps, train_learning_rate=args.learning_rate, lora_rank=args.lora_rank,
        train_kl_coef=args.kl_coef,
        num_epochs=max(1, args.rounds * args.epochs_per_round))
    if args.write_image:
        return _write_png(session, args.output_dir / "image.png")
    if use_masks:
        try:
            return run_masks(session, liked, disliked, args.rounds, args.output_dir)
        except ValueError as error:
            raise SystemExit(f"feedback.py: {error}") from None
    try:
        server = FeedbackServer(session, args.host, args.port)
    except OSError as error:
        raise SystemExit(f"feedback.py: cannot serve on {args.host}:{args.port} ({error}); "
                         "choose another --port") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who can reach it can train and save models", file=sys.stderr)
    print(f"pxpo feedback: open {server.url} (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
