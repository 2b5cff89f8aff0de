"""Smoke runs of the benchmark scripts on tiny models: a lent GPU session is short, and a benchmark that broke
on the CPU would waste it. Timings are not checked here (they mean nothing on tiny models); the rows are."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_trainer(tmp_path, *args, model="--tiny") -> list[dict]:
    out = tmp_path / "trainer.csv"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trainer.py"), model, "--device", "cpu",
                    "--out", str(out), *args], check=True, cwd=tmp_path, capture_output=True, text=True)
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def test_trainer_benchmark_writes_its_rows(tmp_path):
    rows = _bench_trainer(tmp_path, "--benches", "microstep", "epoch")
    metrics = {(r["bench"], r["algorithm"], r["metric"]) for r in rows}
    for algorithm in ("pxpo", "ddpo"):
        assert ("microstep", algorithm, "ms_per_microstep") in metrics
        assert ("epoch", algorithm, "samples_per_s") in metrics
    assert ("microstep", "pxpo", "pxpo_extra_cost") in metrics
    assert all(math.isfinite(float(r["value"])) for r in rows)
    assert not any(r["bench"] == "gradcheck" for r in rows)  # eager: nothing to check


def test_trainer_benchmark_runs_the_sdxl_architecture(tmp_path):
    rows = _bench_trainer(tmp_path, "--sdxl", "--benches", "microstep", "epoch", "--epochs", "1", "--ddpo-epochs", "0")
    metrics = {(r["bench"], r["metric"]) for r in rows}
    assert ("microstep", "ms_per_microstep") in metrics and ("epoch", "samples_per_s") in metrics
    assert {r["variant"] for r in rows} == {"sdxl"} and {r["batch"] for r in rows if r["bench"] == "microstep"} == {"2"}
    assert all(math.isfinite(float(r["value"])) for r in rows)


def test_trainer_benchmark_times_the_embedded_model(tmp_path):
    rows = _bench_trainer(tmp_path, "--benches", "epoch", "--epochs", "1", "--ddpo-epochs", "0", "--train-batch", "8",
                          model="--embedded")
    epochs = [r for r in rows if r["bench"] == "epoch" and r["metric"] == "epoch_s"]
    assert len(epochs) == 1 and epochs[0]["resolution"] == "64" and epochs[0]["steps"] == "10"
    assert float(epochs[0]["value"]) > 0


def test_kl_benchmark_times_the_micro_step_with_and_without_the_penalty(tmp_path):
    rows = _bench_trainer(tmp_path, "--benches", "kl")
    metrics = {(r["algorithm"], r["metric"]) for r in rows if r["bench"] == "kl"}
    assert metrics == {("pxpo", "ms_per_microstep"), ("pxpo+kl", "ms_per_microstep"), ("pxpo+kl", "kl_extra_cost")}
    assert all(math.isfinite(float(r["value"])) for r in rows)


def test_scaling_benchmark_sweeps_batch_size_and_steps_and_plots_them(tmp_path):
    rows = _bench_trainer(tmp_path, "--benches", "scaling")
    batches = {int(r["batch"]) for r in rows if r["metric"] == "ms_per_microstep"}
    sides = {int(r["resolution"]) for r in rows if r["metric"] == "ms_per_microstep"}
    steps = {int(r["steps"]) for r in rows if r["bench"] == "scaling" and r["metric"] == "epoch_s"}
    assert batches == {1, 2} and len(sides) == 2 and steps == {2}
    figure = tmp_path / "scaling.png"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trainer.py"), "--plot", str(tmp_path / "trainer.csv"),
                    "--figure", str(figure)], check=True, cwd=tmp_path, capture_output=True)
    assert figure.stat().st_size > 0


def test_compiled_trainer_benchmark_records_its_gradient_check(tmp_path):
    rows = _bench_trainer(tmp_path, "--compile", "default", "--benches", "microstep", "--reps", "1")
    checks = [r for r in rows if r["bench"] == "gradcheck"]
    assert len(checks) == 1 and checks[0]["metric"] == "compiled_gradient_rel_diff"
    assert checks[0]["variant"] == "compile=default" and float(checks[0]["value"]) >= 0
    assert rows[0]["bench"] == "gradcheck"  # before any compiled timing


def _gpu_checks(tmp_path, stages: str, deadline: int, **extra_env) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path / "out"), STAGES=stages, DEADLINE_S=str(deadline), **extra_env)
    env.pop("TRL_ANCHOR", None)
    # Run from an empty folder: the script installs any wheels it finds in ./.whl, which a test must not do.
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # the tests read the status


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="the GPU script is a bash script")
def test_gpu_script_refuses_unknown_stages_before_doing_anything(tmp_path):
    done = _gpu_checks(tmp_path, "build bench-compild", 60)
    assert done.returncode == 2
    assert "unknown stage 'bench-compild'" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="the GPU script is a bash script")
def test_gpu_script_keeps_later_stages_time_and_skips_what_does_not_fit(tmp_path):
    # The scaling sweep would eat into the TRL anchor's 190 s, so it is skipped (225 - 190 < its 40 s, however
    # long the script's preamble takes); the anchor then runs (and fails at once here: no TRL_ANCHOR), and its
    # failure does not stop the script.
    done = _gpu_checks(tmp_path, "bench-scaling trl-anchor", 225)
    log = (tmp_path / "out" / "session.log").read_text()
    assert done.returncode == 0
    assert "SKIP bench-scaling" in log
    assert "START trl-anchor" in log and "END trl-anchor rc=1" in log and "TRL_ANCHOR is not set" in log


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="the GPU script is a bash script")
def test_gpu_script_returns_the_pretrained_pipeline_in_pieces_that_rebuild_it(tmp_path):
    import tarfile

    from pxpo_ext import embedded

    (tmp_path / "python").symlink_to(ROOT / "python")  # the script runs python/pretrain_tiny.py from its folder
    done = _gpu_checks(tmp_path, "", 60, PRETRAIN_ARGS="--quick --device cpu --threads 1 --workers 1")
    pieces = sorted((tmp_path / "out").glob("tiny-gpu.tar.part*"))
    assert done.returncode == 0 and pieces, done.stdout + done.stderr
    joined = tmp_path / "tiny-gpu.tar"
    joined.write_bytes(b"".join(piece.read_bytes() for piece in pieces))
    with tarfile.open(joined) as tar:
        tar.extractall(tmp_path / "back", filter="data")
    assert "pretrain rc=0" in (tmp_path / "back" / "tiny-gpu" / "pretrain.log").read_text()
    embedded.load_pipeline(path=tmp_path / "back" / "tiny-gpu")


def _bench_cpu_kernels(tmp_path, only: str) -> str:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_kernels.py"), "--threads", "1",
                           "--runs", "1", "--only", only], check=True, cwd=tmp_path, capture_output=True,
                          text=True).stdout


def test_cpu_kernel_benchmark_prints_its_rows_and_the_pooling_floor(tmp_path, native_cpu):
    out = _bench_cpu_kernels(tmp_path, "log-prob, mean")
    rows = [line for line in out.splitlines() if line.startswith("| log-prob")]
    assert len(rows) == 1 and rows[0].endswith("x |") and "floor" not in out  # no pooling row, no floor
    out = _bench_cpu_kernels(tmp_path, "reward_to_latent")
    assert sum(line.startswith("| reward_to_latent") for line in out.splitlines()) == 1
    assert "reward_to_latent's floor, both inputs read once" in out and "ms at 1 thread" in out


def test_ops_benchmark_writes_a_row_per_op_and_provider(tmp_path, native_cpu):
    out = tmp_path / "ops.csv"
    printed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ops.py"), "--device", "cpu",
                              "--batch", "1", "--min-time", "0.002", "--kernels", "--out", str(out)],
                             check=True, cwd=tmp_path, capture_output=True, text=True).stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    providers = {(r["op"], r["provider"]) for r in rows}
    assert ("pxpo_loss fwd+bwd unweighted", "pxpo (loss_and_grad) [cpu]") in providers
    unweighted, weighted = ({r["bytes"] for r in rows if r["op"] == op} for op in ("pxpo_loss fwd+bwd unweighted",
                                                                                  "pxpo_loss fwd+bwd"))
    assert int(unweighted.pop()) == int(weighted.pop()) - 64 * 64 * 4  # no weight row read (B=1, 64 x 64 latents)
    assert ("reward_to_latent weighted", "pxpo [cpu]") in providers
    assert all(float(r["wall_us"]) > 0 and r["batch"] == "1" for r in rows)
    assert f"wrote {len(rows)} rows" in printed
