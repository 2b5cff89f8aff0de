"""Two CPU processes (gloo): the LoRA gradients are averaged across processes (SPEC §6's known trap).

The test launches this file with ``torchrun --nproc_per_node 2``; each process samples its own
rollouts, then computes one micro-step's gradient twice: through the DDP-wrapped UNet (synced)
and inside ``no_sync`` (local). The synced gradient must be the mean of the local ones on every
process. A full epoch then checks that the processes end with identical weights and that a
checkpoint holds one RNG file per process.
"""
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


def test_two_processes_average_lora_gradients(tmp_path):
    from tiny_pipeline import build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "model")
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), model, str(out)]
    # Own process group: on a timeout the workers go too, not only the launcher.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the 2-process run did not finish in 300 s:\n{output[-3000:]}")
    if proc.returncode:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{output[-4000:]}")
    for rank in range(2):
        report = json.loads((out / f"report_{rank}.json").read_text())
        assert report["local_differ"], "the processes saw the same data; the test would prove nothing"
        assert report["local_norm"] > 0
        assert report["synced_is_mean"], f"process {rank}: DDP did not average the LoRA gradients"
        assert report["weights_equal"], "the processes' LoRA weights diverged"
        assert report["samples_seen"] == 4  # 2 images per process per epoch
    checkpoint = out / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "rng_state_0.pt").is_file() and (checkpoint / "rng_state_1.pt").is_file()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
