"""The learning monitor against the ground truth of a small learned world (bench/world.py, bench/quality.py): the
small model taught a world of toys (its UNet and VAE, and the judge that scores renders, come from the committed
pack bench/data/world.safetensors), then taught one subject through the real TrainingRun, every saved step scored
by the judge on decoded renders, as DreamBench scores them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402
import world  # noqa: E402

from dreambooth_ext.train.monitor import COPYING, IGNORING, LEARNED, STILL_LEARNING  # noqa: E402

LONG = {"steps": 600, "save_every": 150, "options": quality.RUNS["high-lr"][1]}
GENTLE = {"steps": 300, "save_every": 150, "options": quality.RUNS["low-lr"][1]}
STEERED = {"steps": 150, "save_every": 75, "options": quality.RUNS["captioned-lora-lr-x3"][1]}
SHORT_STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if world.pack_key(world.FIXTURE) != world.world_key(world.BASE):
        pytest.fail(f"{world.FIXTURE} was not made by bench/world.py as it is now (its world key differs): "
                    "teach the world again with `python bench/world.py --fresh` (about 25 minutes) and commit the pack")
    cache = tmp_path_factory.mktemp("world_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(world.CACHE_ENV, str(cache))
        return quality.prepare(tmp_path_factory.mktemp("quality"), log=lambda message: None)


def test_the_pack_gives_a_base_that_follows_its_captions_and_a_judge_that_tells_the_world(setup):
    assert min(setup["scorer"].accuracy.values()) > 0.8, setup["scorer"].accuracy
    base = setup["base_scores"]
    assert base.prompt > 0.25, base  # renders show the asked place more often than chance (0.2)
    assert base.subject < 0.1, base  # the base has never seen the subject


def test_the_monitor_calls_an_overtrained_run_copying(setup, tmp_path):
    long = quality.study(tmp_path, setup, "long", LONG["steps"], LONG["save_every"], LONG["options"])
    scores, points = long["scores"], long["points"]
    last = scores[LONG["steps"]]
    # the ground truth at the end: renders nearer a photo than the photos are to each other, the asked places no
    # longer shown, and the monitor says so
    assert last["copying"] < 1.0, scores
    assert last["prompt"] < 0.8 * max(s["prompt"] for s in scores.values()), scores
    assert points[LONG["steps"]]["verdict"] == COPYING, points
    # before it, the verdicts did not call copying where the renders were far from the photos
    assert all(points[step]["verdict"] != COPYING for step, s in scores.items() if s["copying"] > 1.2), points


def test_the_monitor_calls_a_short_run_still_learning(setup, tmp_path):
    short = quality.study(tmp_path, setup, "short", SHORT_STEPS, SHORT_STEPS, {"prior_preservation": False})
    assert short["points"][SHORT_STEPS]["verdict"] == STILL_LEARNING, short["points"]
    assert short["scores"][SHORT_STEPS]["subject"] < 0.1, short["scores"]  # it does not look like the subject yet


def test_the_monitor_does_not_call_a_run_learned_while_its_renders_do_not_show_the_subject(setup, tmp_path):
    """At a third of the rate, 300 steps bring the fit far below the base's, but the renders still show neither the
    subject's marks nor anything near the photos: that is still learning (a rule on the fit alone called it
    learned)."""
    gentle = quality.study(tmp_path, setup, "gentle", GENTLE["steps"], GENTLE["save_every"], GENTLE["options"])
    scores, points = gentle["scores"], gentle["points"]
    assert all(s["subject"] < 0.1 for s in scores.values()), scores
    assert points[GENTLE["steps"]]["fit"] < 0.6 * points[0]["fit"], points  # it did fit the photos
    assert all(points[step]["verdict"] != LEARNED for step in scores), points


def test_the_monitor_does_not_call_a_run_ignoring_prompts_while_its_renders_follow_them(setup, tmp_path):
    """LoRA at 3x the rate on photos whose captions name their room: the renders show the asked place at least as
    often as the base's do, so no step may be called ignoring prompts (the former threshold, 0.5, called step 150
    so)."""
    steered = quality.study(tmp_path, setup, "steered", STEERED["steps"], STEERED["save_every"], STEERED["options"])
    scores, points = steered["scores"], steered["points"]
    base_prompt = setup["base_scores"].prompt
    followed = [step for step, s in scores.items() if s["prompt"] >= base_prompt]
    assert followed, (scores, base_prompt)
    assert all(points[step]["verdict"] != IGNORING for step in followed), points
