"""Two CPU processes (gloo): the LoRA gradients are averaged across processes (SPEC §6's known trap).

The test launches this file with ``torchrun --nproc_per_node 2``; each process samples its own
rollouts, then computes one micro-step's gradient twice: through the DDP-wrapped UNet (synced)
and inside ``no_sync`` (local). The synced gradient must be the mean of the local ones on every
process. A full epoch then checks that the processes end with identical weights and that a
checkpoint holds one RNG file per process.

A second launch makes saves fail on the main process only (a full disk, a folder that cannot be
created): every process must raise, the main process its own error and the other one an error
naming the main process and the folder, instead of waiting forever at the next barrier.
"""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _worker(model: str, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from test_trainer import blue_reward, tiny_config

    from pxpo_ext.trainer import PXPOTrainer, load_pipeline

    torch.set_num_threads(1)
    config = tiny_config(model, out, sample_num_steps=2, train_timestep_fraction=0.5, save_freq=1)
    rank = int(os.environ["RANK"])
    prompt = f"a {'red circle' if rank == 0 else 'blue star'}"  # different data on each process
    trainer = PXPOTrainer(config, blue_reward, lambda: (prompt, {}), load_pipeline(model))
    acc = trainer.accelerator
    assert acc.num_processes == 2, acc.num_processes
    assert trainer.timesteps_per_sample == 1, trainer.timesteps_per_sample
    assert isinstance(trainer.unet, torch.nn.parallel.DistributedDataParallel)
    rollouts = trainer.compute_advantages(trainer.sample_epoch())
    batch = {k: rollouts[k] for k in ("embeds", "latents", "log_probs", "timesteps", "advantages", "weights")}
    steps = torch.zeros(2, dtype=torch.long)

    def grads():
        g = torch.cat([p.grad.flatten() for p in trainer.params])
        trainer.optimizer.zero_grad()
        return g

    with acc.no_sync(trainer.unet):
        trainer.backward_timestep(batch, steps)
    local = grads()
    trainer.backward_timestep(batch, steps)  # gradient accumulation is 1 here: DDP all-reduces
    synced = grads()
    gathered = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(gathered, local)
    report = {
        "local_differ": not torch.allclose(gathered[0], gathered[1]),
        "synced_is_mean": torch.allclose(synced, (gathered[0] + gathered[1]) / 2, rtol=1e-5, atol=1e-8),
        "local_norm": local.norm().item(),
    }
    trainer.train()  # one full epoch with a checkpoint saved by both processes
    weights = torch.cat([p.detach().flatten() for p in trainer.params])
    all_weights = [torch.empty_like(weights) for _ in range(2)]
    dist.all_gather(all_weights, weights)
    report["weights_equal"] = torch.equal(all_weights[0], all_weights[1])
    report["samples_seen"] = trainer.samples_seen
    trainer.close()
    Path(out, f"report_{rank}.json").write_text(json.dumps(report))


def _torchrun(args: list[str], timeout: int) -> None:
    """This file as a script in two CPU processes, killed (all of them) after ``timeout`` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), *args]
    # Own process group: on a timeout the workers go too, not only the launcher.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process run did not finish in {timeout} s:\n{output[-3000:]}")
    if proc.returncode:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{output[-4000:]}")


def test_two_processes_average_lora_gradients(tmp_path):
    from tiny_pipeline import build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "model")
    out = tmp_path / "run"
    out.mkdir()
    _torchrun([model, str(out)], timeout=300)
    for rank in range(2):
        report = json.loads((out / f"report_{rank}.json").read_text())
        assert report["local_differ"], "the processes saw the same data; the test would prove nothing"
        assert report["local_norm"] > 0
        assert report["synced_is_mean"], f"process {rank}: DDP did not average the LoRA gradients"
        assert report["weights_equal"], "the processes' LoRA weights diverged"
        assert report["samples_seen"] == 4  # 2 images per process per epoch
    checkpoint = out / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "rng_state_0.pt").is_file() and (checkpoint / "rng_state_1.pt").is_file()


def _failing_saves_worker(out: str) -> None:
    """Saves that fail on the main process only; records what each process raised in ``report_<rank>.json``."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    import pxpo_ext.trainer.trainer as trainer_module
    from pxpo_ext.trainer import PXPOTrainer
    from pxpo_ext.trainer import checkpoint as ckpt

    acc = Accelerator(cpu=True)
    root = Path(out)
    state = {"trainable": {"w": torch.zeros(2)}, "optimizer": {}, "lr_scheduler": {}, "stat_tracker": {},
             "trainer_state": {"epoch": 1}, "rng_state": ckpt.capture_rng()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_save = torch.save

    def save_fills_main_disk(obj, f, *args, **kwargs):
        if acc.is_main_process and Path(f).name == "optimizer.pt":
            disk_full()
        return real_save(obj, f, *args, **kwargs)

    def checkpoint_on_a_full_disk():
        ckpt.torch.save = save_fills_main_disk  # the very function checkpoint.py calls
        try:
            ckpt.save_checkpoint(root / "checkpoints" / "checkpoint-2", acc, **state)
        finally:
            ckpt.torch.save = real_save

    def weights_on_a_full_disk():  # the trainer's own method; only the main process writes weights
        trainer_module.save_lora = disk_full
        trainer = SimpleNamespace(accelerator=acc, config=SimpleNamespace(use_lora=True, lora_rank=4, lora_alpha=None),
                                  _unwrapped_unet=None)
        PXPOTrainer.save_pretrained(trainer, root / "lora")

    cases = {  # all but the last fail on the main process only; every process must end each case in step
        "checkpoint_disk_full": checkpoint_on_a_full_disk,
        "checkpoint_folder_under_a_file": lambda: ckpt.save_checkpoint(root / "a_file" / "checkpoint-1", acc, **state),
        "weights_disk_full": weights_on_a_full_disk,
        "then_a_save_that_works": lambda: ckpt.save_checkpoint(root / "checkpoints" / "checkpoint-3", acc, **state),
    }
    report = {}
    for name, case in cases.items():
        try:
            case()
            report[name] = None
        except Exception as error:  # noqa: BLE001
            report[name] = {"type": type(error).__name__, "errno": getattr(error, "errno", None),
                            "message": getattr(error, "strerror", None) or str(error)}
    Path(out, f"report_{acc.process_index}.json").write_text(json.dumps(report))
    # Both processes leave together with the process group torn down: a gloo thread still running at
    # interpreter exit aborts the process ("terminate called without an active exception").
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_a_save_that_fails_on_the_main_process_fails_on_every_process(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "a_file").write_text("")  # a checkpoint folder under it cannot be created
    _torchrun(["--failing-saves", str(out)], timeout=60)  # a hang (the regression) ends here, not in CI's timeout
    main, other = (json.loads((out / f"report_{rank}.json").read_text()) for rank in range(2))
    checkpoint = repr(str(out / "checkpoints" / "checkpoint-2"))
    full = main["checkpoint_disk_full"], other["checkpoint_disk_full"]
    assert [(r["type"], r["errno"]) for r in full] == [("OSError", errno.ENOSPC)] * 2
    assert full[0]["message"].startswith(f"could not write checkpoint {checkpoint}: the disk is full")
    assert full[1]["message"].startswith(f"the main process failed to save checkpoint {checkpoint}: could not write")
    for name, folder, code in (("checkpoint_folder_under_a_file", out / "a_file" / "checkpoint-1", errno.ENOTDIR),
                               ("weights_disk_full", out / "lora", errno.ENOSPC)):
        # the same OSError subclass and errno on both (OSError(ENOTDIR, ...) is a NotADirectoryError)
        assert (main[name]["type"], main[name]["errno"]) == (other[name]["type"], code), other[name]
        assert str(folder) in main[name]["message"]
        assert other[name]["message"].startswith("the main process failed to save"), other[name]
        assert str(folder) in other[name]["message"]
    assert "the disk is full" in other["weights_disk_full"]["message"]
    assert main["then_a_save_that_works"] is None and other["then_a_save_that_works"] is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]  # no temporary folder left
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-3").glob("rng_state_*")) == [
        "rng_state_0.pt", "rng_state_1.pt"]

if __name__ == "__main__":
    if sys.argv[1] == "--failing-saves":
        _failing_saves_worker(sys.argv[2])
    else:
        _worker(sys.argv[1], sys.argv[2])
