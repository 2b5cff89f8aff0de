"""The experiment library (curves, measures, the scripted person, CSV) and a smoke run of every
``python/experiment_*.py`` with ``--quick`` on a tiny random pipeline built from configs."""
import argparse
import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pxpo_ext.experiments import curves, figures, person, settings
from pxpo_ext.experiments.evaluation import (
    circles_by_judge,
    diversity,
    eval_set,
    mean_rewards,
    min_circle_pixels,
)
from pxpo_ext.rewards import RewardOutput
from pxpo_ext.scenes import COLOURS, SHAPES, SceneGenerator
from pxpo_ext.trainer.prompts import CyclingPrompts, get_prompt_fn

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- curves
def test_queries_to_reach_interpolates_between_epochs():
    assert curves.queries_to_reach([16, 32, 48], [-0.5, -0.3, -0.1], -0.2) == pytest.approx(40.0)
    assert curves.queries_to_reach([16, 32], [-0.1, -0.3], -0.2) == 16.0  # already there at the first point
    assert math.isnan(curves.queries_to_reach([16, 32], [-0.5, -0.4], -0.2))


def test_stack_curves_refuses_different_query_schedules():
    queries, rewards = curves.stack_curves([[16, 32], [16, 32]], [[0.0, 1.0], [2.0, 3.0]])
    assert queries.tolist() == [16, 32] and rewards.shape == (2, 2)
    with pytest.raises(ValueError, match="different schedules"):
        curves.stack_curves([[16, 32], [8, 16]], [[0.0, 1.0], [2.0, 3.0]])


def test_summary_smoothing_final_reward_and_choice():
    stats = curves.summarise(np.array([[0.0, 2.0], [2.0, 4.0]]))
    assert stats["mean"].tolist() == [1.0, 3.0] and stats["std"] == pytest.approx([math.sqrt(2)] * 2)
    assert curves.summarise(np.array([[1.0, 2.0]]))["std"].tolist() == [0.0, 0.0]
    assert curves.smooth([1.0, 3.0, 5.0]).tolist() == [1.0, 2.0, 4.0]
    assert curves.final_reward([0.0, 1.0, 3.0]) == 2.0
    assert curves.best_setting({3e-4: -0.2, 1e-3: -0.1, 3e-3: -0.1}) == 1e-3  # ties go to the first listed


def test_paired_difference_counts_seeds_and_brackets_the_mean():
    a, b = [0.3, 0.1, 0.5, 0.2], [0.1, 0.2, 0.1, 0.1]
    stats = curves.paired_difference(a, b)
    assert stats["mean"] == pytest.approx(0.15)
    assert (stats["a_higher"], stats["a_lower"], stats["equal"], stats["seeds"]) == (3, 1, 0, 4)
    assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
    assert -0.1 <= stats["ci_low"] and stats["ci_high"] <= 0.4  # within the per-seed differences' range
    assert curves.paired_difference(a, b) == stats  # a fixed generator: reproducible
    same = curves.paired_difference(b, b)
    assert same["mean"] == same["ci_low"] == same["ci_high"] == 0.0 and same["equal"] == 4
    with pytest.raises(ValueError, match="equal-length"):
        curves.paired_difference([1.0, 2.0], [1.0])
    assert curves.mean_after_start([[9.0, 1.0, 3.0], [0.0, 2.0, 2.0]]).tolist() == [2.0, 2.0]


def test_cycling_prompts_repeat_in_order_with_fixed_noise_and_resume():
    source = CyclingPrompts(["a", "b", "c"], noise_seed=100)
    assert [source() for _ in range(4)] == [("a", {"seed": 100}), ("b", {"seed": 101}), ("c", {"seed": 102}),
                                            ("a", {"seed": 100})]
    again = CyclingPrompts(["a", "b", "c"], noise_seed=100)
    again.load_state_dict(source.state_dict())
    assert again() == source() == ("b", {"seed": 101})
    assert CyclingPrompts(["a"])() == ("a", {})
    with_metadata = CyclingPrompts(["a", "b"], noise_seed=7, metadata=[{"k": 1}, {"k": 2, "seed": 0}])
    assert [with_metadata() for _ in range(2)] == [("a", {"k": 1, "seed": 7}), ("b", {"k": 2, "seed": 8})]
    with pytest.raises(ValueError, match="2 metadata dicts for 1 prompts"):
        CyclingPrompts(["a"], metadata=[{}, {}])


def test_cycle_prompt_source_draws_once_then_repeats_with_fixed_noise():
    first = get_prompt_fn("cycle:3:animals", seed=2)
    drawn = [first() for _ in range(6)]
    assert drawn[:3] == drawn[3:] and len({p for p, _ in drawn}) <= 3
    assert [m["seed"] for _, m in drawn[:3]] == [3_000_000, 3_000_001, 3_000_002]
    again = get_prompt_fn("cycle:3:animals", seed=2)
    assert [again() for _ in range(3)] == drawn[:3]  # reproducible
    for bad in ("cycle:0:scenes", "cycle:x:scenes", "cycle:4", "cycle:4:nowhere"):
        with pytest.raises(ValueError, match="cycle|unknown prompt source"):
            get_prompt_fn(bad)


# ---------------------------------------------------------------- measures
def test_diversity_is_zero_for_identical_seeds_and_positive_across_prompts():
    red = torch.zeros(3, 8, 8)
    red[0] = 1
    images = torch.stack([red, red, 1 - red, 1 - red])
    prompts, _ = eval_set(["p", "q"], 2)
    out = diversity(images, prompts)
    assert out["within_prompt_rms"] == 0.0 and out["across_prompt_rms"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two or more"):
        diversity(images[:2], ["p", "q"])


def test_judge_finds_circles_only_where_the_generator_drew_one():
    gen = SceneGenerator(image_size=64, seed=0, max_objects=1, two_tone=False)
    scenes = [gen.sample(i) for i in range(40)]
    with_circle = next(s for s in scenes if s.objects[0]["shape"] == "circle")
    without = next(s for s in scenes if s.objects[0]["shape"] != "circle")
    assert circles_by_judge(torch.stack([with_circle.image, without.image])) == [True, False]
    assert with_circle.objects[0]["mask"].sum() > min_circle_pixels(64, 64)


def test_mean_rewards_respects_the_weight_map():
    images = torch.full((2, 3, 4, 4), 0.5)

    def reward(images, prompts, metadata):
        r = torch.zeros(2, 4, 4)
        r[:, :2] = 1.0
        w = torch.zeros(2, 4, 4)
        w[0, :2] = 1.0  # image 0: feedback only where the reward is 1
        w[1] = 1.0
        return RewardOutput(r, weight=w)

    assert mean_rewards(reward, images, ["p", "p"], [0, 1]) == pytest.approx([1.0, 0.5])


def test_scripted_person_prefers_red_in_the_region_and_the_original_outside():
    original = torch.zeros(3, 8, 8)
    original[2] = 1.0  # all blue
    region = torch.zeros(8, 8)
    region[2:6, 2:6] = 1
    edited = original.clone()
    edited[:, 2:6, 2:6] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    out = person.RegionColourPerson(region, "red", original)(torch.stack([original, edited]))
    assert out.weight is None
    assert out.reward[1, 3, 3] > out.reward[0, 3, 3]  # red where asked scores higher
    assert out.reward[0, 0, 0] == out.reward[1, 0, 0] == 0.0  # untouched outside: the best score
    palette_red = torch.tensor(COLOURS["red"], dtype=torch.float32).view(3, 1, 1) / 255
    painted = original.clone()
    painted[:, 2:6, 2:6] = palette_red
    assert person.colour_fraction(painted, region, "red") == 1.0
    assert person.colour_fraction(original, region, "red") == 0.0
    assert person.outside_change(painted, original, region) == 0.0


def test_scripted_person_grades_the_outside_against_the_image_from_the_samples_own_noise():
    original = torch.zeros(3, 8, 8)
    original[2] = 1.0  # the image the person saw: all blue
    drawn_from_5 = torch.zeros(3, 8, 8)
    drawn_from_5[0] = 1.0  # what the initial model drew from noise seed 5: all red
    region = torch.zeros(8, 8)
    region[2:6, 2:6] = 1
    judge = person.RegionColourPerson(region, "red", original, before_by_seed={5: drawn_from_5})
    out = judge(torch.stack([drawn_from_5, drawn_from_5]), ["p", "p"], [{"seed": 5}, {"seed": 9}])
    assert out.reward[0, 0, 0] == 0.0  # as drawn from its own noise: the best score outside
    assert out.reward[1, 0, 0] < 0.0  # seed 9 has no image of its own: graded against the image the person saw
    assert torch.equal(out.reward[0, 3, 3], out.reward[1, 3, 3])  # the region is graded the same way for both


def test_background_half_is_that_half_less_the_objects_and_their_rims():
    scene = next(sc for sc in (SceneGenerator(image_size=64, seed=7).sample(i) for i in range(50))
                 if len(sc.objects) == 1 and sc.objects[0]["mask"][:32].sum() > 0 and sc.objects[0]["mask"][32:].sum() == 0)
    obj = torch.as_tensor(scene.objects[0]["mask"]).float()
    top, how = person.background_half(torch.as_tensor(scene.image), "top")
    assert how.startswith("the top half of the background")
    assert top[32:].sum() == 0  # nothing of the bottom half
    assert (top * obj).sum() == 0  # not the object
    assert 0 < top.sum() < 32 * 64 - obj.sum()  # the rest of the top half, less a rim around the object
    bottom, _ = person.background_half(torch.as_tensor(scene.image), "bottom")
    assert bottom[:32].sum() == 0 and bottom[32:].sum() == 32 * 64  # no object there: the whole half
    with pytest.raises(ValueError, match="'top' or 'bottom'"):
        person.background_half(torch.as_tensor(scene.image), "left")


def test_extra_object_is_what_the_caption_does_not_name_and_the_rest_is_judged_object_by_object():
    scene = next(sc for sc in (SceneGenerator(image_size=64, seed=7).sample(i) for i in range(50))
                 if len(sc.objects) == 2 and len(sc.background) == 1)
    image = torch.as_tensor(scene.image)
    first, second = scene.objects
    with pytest.raises(ValueError, match="nothing in this image beyond"):
        person.extra_object(image, scene.caption)  # both objects named
    only_first = f"a {first['colour']} {first['shape']} on a {scene.background[0]} background"
    region, how = person.extra_object(image, only_first)
    assert torch.equal(region.bool(), torch.as_tensor(second["mask"]))
    assert how == f"the {second['colour']} {second['shape']} the judge found, which the caption does not name"
    assert person.objects_outside(image, region) == [f"{first['colour']} {first['shape']}"]
    assert person.region_colour(image, region) == second["colour"]  # the control asks for what is there
    assert person.objects_outside(image, torch.zeros(64, 64)) == sorted(f"{o['colour']} {o['shape']}"
                                                                        for o in scene.objects)
    assert person.background_colour(only_first) == scene.background[0]
    with pytest.raises(ValueError, match="two-tone background"):
        person.background_colour("a red circle on a white and blue background")


def test_a_named_object_drawn_in_the_wrong_shape_is_not_extra():
    scene = next(sc for sc in (SceneGenerator(image_size=64, seed=7).sample(i) for i in range(200))
                 if len(sc.objects) == 2 and len(sc.background) == 1 and sc.objects[0]["colour"] != sc.objects[1]["colour"])
    image = torch.as_tensor(scene.image)
    first, second = scene.objects
    other_shape = next(shape for shape in SHAPES if shape != first["shape"])
    # The caption asks for the first object in another shape: what is there is that object, misdrawn.
    misdrawn = f"a {first['colour']} {other_shape} and a {second['colour']} {second['shape']} on a {scene.background[0]} background"
    with pytest.raises(ValueError, match="nothing in this image beyond"):
        person.extra_object(image, misdrawn)
    # Named in the wrong colour, it is extra.
    recoloured = next(c for c in COLOURS if c not in (first["colour"], second["colour"], scene.background[0]))
    region, _ = person.extra_object(image, f"a {recoloured} {first['shape']} and a {second['colour']} {second['shape']} "
                                           f"on a {scene.background[0]} background")
    assert torch.equal(region.bool(), torch.as_tensor(first["mask"]))


_ORPHAN_SCRIPT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from pxpo_ext.experiments.runs import exit_with_parent

def busy(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent,
                               initargs=(os.getpid(), 0.1))
    pool.submit(busy, sys.argv[1])
    while not os.path.exists(sys.argv[1]) or not open(sys.argv[1]).read():
        time.sleep(0.05)
    os._exit(0)  # the parent dies mid-task, as under `kill PID`
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_pool_workers_end_with_their_parent(tmp_path):
    import subprocess
    import sys
    import time

    script, pid_file = tmp_path / "orphan.py", tmp_path / "worker.pid"
    script.write_text(_ORPHAN_SCRIPT)
    subprocess.run([sys.executable, str(script), str(pid_file)], check=True, timeout=120)
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")

    def running() -> bool:  # a zombie has ended; only its exit status waits to be read
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.time() + 20
    while running() and time.time() < deadline:
        time.sleep(0.1)
    assert not running(), "the pool's worker kept running after its parent died"


def test_write_csv_unions_the_columns(tmp_path):
    path = figures.write_csv(tmp_path / "x.csv", [{"a": 1, "b": 0.5}, {"a": 2, "c": float("nan")}])
    rows = list(csv.DictReader(path.open()))
    assert rows == [{"a": "1", "b": "0.5", "c": ""}, {"a": "2", "b": "", "c": ""}]


# ---------------------------------------------------------------- the scripts, --quick
@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_quick(name, tiny_model, tmp_path, *extra):
    out = tmp_path / "figures"
    record = load_script(name).main(["--quick", "--model", tiny_model, "--out", str(out),
                                     "--runs-dir", str(tmp_path / "runs"), "--threads", "1", *extra])
    provenance = json.loads(next(out.glob("*_provenance.json")).read_text())
    assert provenance["wall_seconds"] > 0 and "--quick" in provenance["command"] and provenance["machine"]
    assert provenance["command"].startswith(f"python python/{name}.py ")  # the program a reader would run
    return record, out


CONSTANT_REWARD = """
import torch

def quarter(images, prompts, metadata):
    return torch.full((images.shape[0], *images.shape[2:]), 0.25)
"""


@pytest.mark.parametrize("captions, kl, own_reward, set_options", [
    ("plain", "0", False, []),
    ("default-run", "0.5", True, ["--set", "sample_guidance_scale=3", "advantage-std-floor=0.01"])])
def test_sample_efficiency_quick(tiny_model, tmp_path, captions, kl, own_reward, set_options):
    reward = []
    if own_reward:  # any reward, named on the command line as train.py takes it
        (tmp_path / "my_reward.py").write_text(CONSTANT_REWARD)
        reward = ["--reward", f"{tmp_path / 'my_reward.py'}:quarter"]
    record, out = run_quick("experiment_sample_efficiency", tiny_model, tmp_path, "--jobs", "1", "--captions", captions,
                            "--kl-coef", kl, *reward, *set_options)
    assert record["captions"] == captions and len(set(record["train_prompts"])) > 1
    if set_options:  # any other trainer option, for every run
        assert record["set_options"] == {"sample_guidance_scale": 3.0, "advantage_std_floor": 0.01}
        assert record["train_config"]["sample_guidance_scale"] == 3.0 and record["train_config"]["advantage_std_floor"] == 0.01
    assert record["reward"] == (reward[1] if own_reward else "colour") and record["reward_kwargs"] == {}
    assert record["kl_coef"] == float(kl) and record["train_config"]["train_kl_coef"] == float(kl)
    # Every run's final weights, and the initial model's, were judged on the training captions (1 image each).
    judged = [record["judged_initial"], *record["judged_final"]["pxpo"], *record["judged_final"]["ddpo"]]
    assert len(judged) == 5 and all(j["n"] == len(record["train_prompts"]) for j in judged)
    assert all(0.0 <= j[k] <= 1.0 for j in judged for k in ("background", "dark"))
    # Every named object was found or missed for one reason.
    assert all(j["objects"] + j["wrong_shape"] + j["wrong_size"] + j["absent"] == pytest.approx(1.0) for j in judged)
    assert set(record["queries_to_reach_ddpo_best"]) == {"pxpo", "ddpo"}
    assert record["queries_to_reach_ddpo_best"]["ddpo"] <= record["budget"]  # DDPO reaches its own best
    runs = list(csv.DictReader((out / "sample_efficiency_runs.csv").open()))
    # 2 learning rates x 2 methods at seed 0, then seed 1 for each method (seed 0 reused), 2 epochs each
    assert len(runs) == (2 * 2 + 2) * 2
    assert {r["method"] for r in runs} == {"pxpo", "ddpo"}
    assert all(r["held_out_reward"] != "" and 0.0 <= float(r["judged_background"]) <= 1.0 for r in runs)
    if own_reward:  # every run learned from it
        assert {float(r["reward_mean"]) for r in runs} == {0.25} and {float(r["held_out_reward"]) for r in runs} == {0.25}
    summary = list(csv.DictReader((out / "sample_efficiency_summary.csv").open()))
    assert all(float(row["judged_background_before"]) == record["judged_initial"]["background"] for row in summary[:2])
    assert set(record["chosen_lr"]) == {"pxpo", "ddpo"} and record["budget"] == 4.0
    assert (out / "sample_efficiency.png").stat().st_size > 0 and (out / "sample_efficiency_lr_grid.png").exists()
    paired = record["paired_over_seeds"]
    assert set(paired) == {"final_reward", "mean_reward_after_start", "held_out_reward"}
    assert all(d["seeds"] == 2 and d["ci_low"] <= d["mean"] <= d["ci_high"] for d in paired.values())


@pytest.mark.parametrize("tokens, message", [
    (["sample_guidance_scal=3"], "unknown key 'sample_guidance_scal' (did you mean 'sample_guidance_scale'?)"),
    (["sample_guidance_scale"], "--set takes key=value pairs"),
    (["train_kl_coef=lots"], "train_kl_coef expects"),
    (["train_learning_rate=1e-3"], "--set train_learning_rate: this program sets it itself"),
    (["train_kl_coef=0.1", "seed=3"], "--set seed, train_kl_coef: this program sets them itself"),
])
def test_set_refuses_unknown_malformed_and_program_owned_options(tokens, message):
    args = argparse.Namespace(quick=False, set=tokens)
    with pytest.raises(SystemExit) as exit_:
        settings.train_config(args, train_kl_coef=0.0)
    assert message in str(exit_.value)


def test_set_comes_after_the_shared_settings_and_the_programs_own():
    args = argparse.Namespace(quick=False, set=["sample_batch_size=4", "train_cfg=false"])
    config = settings.train_config(args, train_timestep_fraction=0.5)
    assert config["sample_batch_size"] == 4 and config["train_cfg"] is False
    assert config["train_timestep_fraction"] == 0.5 and config["sample_num_steps"] == settings.TRAIN_CONFIG["sample_num_steps"]


@pytest.mark.parametrize("name, models", [("experiment_colour", ["initial", "pxpo", "ddpo"]),
                                         ("experiment_segmentation", ["initial", "pxpo"])])
def test_before_after_experiments_quick(tiny_model, tmp_path, name, models):
    record, out = run_quick(name, tiny_model, tmp_path)
    results = record["results"]
    assert [r["model"].split()[0] for r in results] == models
    assert all(0.0 <= r["fidelity_background"] <= 1.0 and r["diversity_within_prompt_rms"] >= 0 for r in results)
    prefix = name.split("_")[1]
    assert (out / f"{prefix}_grid.png").exists() and (out / f"{prefix}_results.csv").exists()


@pytest.mark.parametrize("extra", [["--kl-coef", "1"], ["--region-seed", "3", "--outside", "unmarked",
                                                       "--noise-seeds", "1", "--colour", "background"]])
def test_person_experiment_quick(tiny_model, tmp_path, extra):
    record, out = run_quick("experiment_person", tiny_model, tmp_path, *extra)
    moved = "--region-seed" in extra
    assert record["noise_seeds"] == (1 if moved else 8) and record["outside"] == ("unmarked" if moved else "keep")
    assert ("seed 3" in record["region"]) == moved
    assert record["colour"] == ("white" if moved else "red")  # the default prompt's background is white
    rounds = record["rounds"]
    assert record["kl_coef"] == (0.0 if moved else 1.0)
    assert all((r.get("reference_kl") is not None) == (not moved) for r in rounds[1:])
    assert [r["round"] for r in rounds][:2] == [0, 1] and len(rounds) <= 3
    assert all(0.0 <= r["colour_fraction"] <= 1.0 for r in rounds)
    assert rounds[0]["rest_kept"] and all(isinstance(r["objects_outside"], str) for r in rounds)
    assert (out / "person_rounds.png").exists()
