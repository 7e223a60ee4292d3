"""The training run end to end on a tiny model: loss terms, resume, saving, class images, options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dreambooth_ext.config import from_dict, to_dict
from dreambooth_ext.errors import DreamboothError
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.models.checkpoint import read_checkpoint
from dreambooth_ext.models.tiny import save_tiny_checkpoint
from dreambooth_ext.train.run import Progress, TrainingRun

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny_sd1.safetensors", family="sd1", seed=0)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instance")
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        image = Image.new("RGB", (80, 64), color)
        image.paste((250, 250, 0), (10 + 5 * i, 10, 40, 40))
        image.save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("class")
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(folder / f"class{i}.png")
    return folder


def make_config(base: Path, instance: Path, class_folder: Path | None = None, **overrides):
    concept = {"instance_dir": str(instance), "token": "ohwx", "class_word": "toy", "num_class_images": 3}
    if class_folder is not None:
        concept["class_dir"] = str(class_folder)
    concept.update(overrides.pop("concept", {}))
    data = {"project_name": "t", "base_model": str(base), "resolution": 64, "max_train_steps": 4,
            "learning_rate": 1e-3, "seed": 5, "prior_preservation": class_folder is not None,
            "save_precision": "fp32", "concepts": [concept]}
    data.update(overrides)
    return from_dict(data)


def train(config, root: Path, **kwargs):
    host = FolderHost(root / "models")
    run = TrainingRun(config, host, **kwargs)
    return run, run.run()


def unet_of(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_checkpoint(path).items() if k.startswith(UNET)}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_run_writes_webui_checkpoint_that_differs_from_base(tiny_sd1, instance_dir, class_dir, tmp_path):
    config = make_config(tiny_sd1, instance_dir, class_dir, save_precision="fp16")
    _, result = train(config, tmp_path)
    assert result.status == "finished" and result.step == 4
    path = result.checkpoints[-1]
    assert path == tmp_path / "models" / "Stable-diffusion" / "t" / "t_4.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["t_4.safetensors"]  # no temp files left behind
    trained, base = read_checkpoint(path), read_checkpoint(tiny_sd1)
    assert trained.keys() == base.keys()
    assert trained[UNET + "input_blocks.0.0.weight"].dtype == torch.float16
    assert max_difference(unet_of(path), {k: v for k, v in base.items() if k.startswith(UNET)}) > 1e-3
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["dreambooth.token"] == "ohwx"
    assert metadata["dreambooth.steps"] == "4"
    assert json.loads(metadata["dreambooth.config"])["learning_rate"] == 1e-3
    assert "modelspec.architecture" in metadata


def test_prior_loss_term_reaches_the_gradient(tiny_sd1, instance_dir, class_dir, tmp_path):
    """The class images' loss must change the update (a known competitor computes it and drops it)."""
    # A large Adam epsilon makes the update proportional to the gradient, so float noise in tiny gradients
    # stays tiny instead of being normalized up to the learning rate.
    sgd_like = {"max_train_steps": 2, "learning_rate": 1.0, "adam_epsilon": 1.0, "max_grad_norm": 0.0,
                "mixed_precision": "no"}  # fp32: bf16's rounding would outweigh the 1e-4 this compares at
    without = make_config(tiny_sd1, instance_dir, None, **sgd_like)
    weight0 = make_config(tiny_sd1, instance_dir, class_dir, prior_loss_weight=0.0, **sgd_like)
    weight1 = make_config(tiny_sd1, instance_dir, class_dir, prior_loss_weight=1.0, **sgd_like)
    results = {name: unet_of(train(cfg, tmp_path / name)[1].checkpoints[-1])
               for name, cfg in (("without", without), ("w0", weight0), ("w1", weight1))}
    base = {k: v for k, v in read_checkpoint(tiny_sd1).items() if k.startswith(UNET)}
    update = max_difference(results["without"], base)
    # Weight 0: the class samples ride along in the batch but contribute nothing.
    assert max_difference(results["w0"], results["without"]) < 1e-4 * update
    # Weight 1: the class term changes the update substantially.
    assert max_difference(results["w1"], results["w0"]) > 0.1 * update


def test_cancel_then_resume_matches_an_uninterrupted_run(tiny_sd1, instance_dir, class_dir, tmp_path):
    config = make_config(tiny_sd1, instance_dir, class_dir, max_train_steps=6, lr_scheduler="cosine",
                         lr_warmup_steps=2, ema=True, ema_decay=0.5)
    _, straight = train(config, tmp_path / "straight")

    root = tmp_path / "interrupted"
    holder = {}

    def stop_at_3(p: Progress) -> None:
        if p.phase == "training" and p.step == 3:
            holder["run"].cancel()

    run = TrainingRun(config, FolderHost(root / "models"), on_progress=stop_at_3)
    holder["run"] = run
    cancelled = run.run()
    assert cancelled.status == "cancelled" and cancelled.step == 3
    state_dir = root / "models" / "dreambooth" / "t" / "state"
    # No pickle anywhere: hosts may replace torch.load (the WebUI's checker refuses recent torch.save files).
    assert sorted(p.name for p in state_dir.iterdir()) == ["ema.safetensors", "optimizer.safetensors",
                                                           "state.json", "weights.safetensors"]
    assert not cancelled.checkpoints

    _, resumed = train(config, root, resume=True)
    assert resumed.status == "finished" and resumed.step == 6
    assert [s for s, _ in resumed.losses] == [4, 5, 6]
    assert max_difference(unet_of(resumed.checkpoints[-1]), unet_of(straight.checkpoints[-1])) < 1e-5
    assert not (root / "models" / "dreambooth" / "t" / "state").exists()  # finished: state cleaned up


def test_a_cancel_before_the_first_step_says_nothing_is_kept_and_skips_the_base_measure(
        tiny_sd1, instance_dir, tmp_path):
    """Seen in a real Forge: cancelled while it cached, a run first measured the base for the learning monitor (50 s
    on an SDXL on a CPU), then said its state was kept for Resume, which then found none."""
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4)
    seen = []

    def cancel_while_caching(p: Progress) -> None:
        seen.append(p)
        if p.phase == "caching":
            holder["run"].cancel()

    holder = {}
    holder["run"] = TrainingRun(config, FolderHost(tmp_path / "models"), on_progress=cancel_while_caching)
    result = holder["run"].run()
    assert result.status == "cancelled" and result.step == 0
    assert not [p for p in seen if p.phase == "monitoring"]  # the base was not measured
    assert seen[-1].message == "Cancelled before the first step: nothing was saved, so Start begins again"
    assert not (tmp_path / "models" / "dreambooth" / "t" / "state").exists()

    state = stop_at(config, tmp_path / "second", 2)  # a stopped run, resumed, then cancelled before its first step
    before = {path.name: path.read_bytes() for path in state.iterdir()}
    seen.clear()
    holder["run"] = TrainingRun(config, FolderHost(tmp_path / "second" / "models"), resume=True,
                                on_progress=cancel_while_caching)
    result = holder["run"].run()
    assert result.status == "cancelled" and seen[-1].message == "Cancelled at step 2; Resume continues from there"
    assert {path.name: path.read_bytes() for path in state.iterdir()} == before  # its state as it was


def test_resume_without_saved_state_is_a_clear_error(tiny_sd1, instance_dir, tmp_path):
    with pytest.raises(DreamboothError, match="has no stopped run to resume.*Start trains it from step 0"):
        train(make_config(tiny_sd1, instance_dir), tmp_path, resume=True)


def stop_at(config, root: Path, step: int) -> Path:
    """Run `config` under `root` and cancel it at `step`; returns its saved state's folder."""
    holder = {}

    def stop(p: Progress) -> None:
        if p.phase == "training" and p.step == step:
            holder["run"].cancel()

    holder["run"] = TrainingRun(config, FolderHost(root / "models"), on_progress=stop)
    assert holder["run"].run().status == "cancelled"
    return root / "models" / "dreambooth" / config.project_name / "state"


def test_start_on_a_project_with_a_stopped_run_is_refused_before_loading_and_keeps_its_state(
        tiny_sd1, instance_dir, tmp_path):
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4)
    state = stop_at(config, tmp_path, 2)
    saved = (state / "weights.safetensors").read_bytes()
    phases = []
    with pytest.raises(DreamboothError, match="has a run stopped at step 2 of 4.*Resume continues it"):
        train(config, tmp_path, on_progress=lambda p: phases.append(p.phase))
    assert "loading" not in phases and (state / "weights.safetensors").read_bytes() == saved
    assert train(config, tmp_path, resume=True)[1].status == "finished"


def test_start_on_a_project_with_earlier_results_is_refused_and_writes_over_nothing(tiny_sd1, instance_dir,
                                                                                     tmp_path):
    """A second Start of a finished project would write `<project>_<step>.safetensors` again: over the first run's
    result, which may be the very model it trains from (loaded in the WebUI after the first run)."""
    config = make_config(tiny_sd1, instance_dir, max_train_steps=2)
    result = train(config, tmp_path)[1].checkpoints[-1]
    again = from_dict({**to_dict(config), "base_model": str(result)})  # train further from the result
    before, phases = result.read_bytes(), []
    with pytest.raises(DreamboothError, match=rf"has the results of an earlier run in .*\({result.name}\).*another "
                                              "project name"):
        train(again, tmp_path, on_progress=lambda p: phases.append(p.phase))
    assert "loading" not in phases and result.read_bytes() == before
    renamed = from_dict({**to_dict(again), "project_name": "further"})
    assert train(renamed, tmp_path)[1].status == "finished"


def test_resume_on_another_base_model_is_refused_and_says_which_one_it_needs(tiny_sd1, instance_dir, tmp_path):
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4)
    stop_at(config, tmp_path, 2)
    other = save_tiny_checkpoint(tmp_path / "other.safetensors", family="sd1", seed=1)
    moved = from_dict({**to_dict(config), "base_model": str(other)})
    with pytest.raises(DreamboothError, match=r"stopped while training tiny_sd1.safetensors \[[0-9a-f]{10}\]; the "
                                              r"model to train now is other.safetensors"):
        train(moved, tmp_path, resume=True)
    same = tmp_path / "same_weights.safetensors"  # the same file under another name is the same model
    same.write_bytes(tiny_sd1.read_bytes())
    assert train(from_dict({**to_dict(config), "base_model": str(same)}), tmp_path, resume=True)[1].step == 4


def test_a_resume_with_changed_options_says_which_in_the_runs_warnings(tiny_sd1, instance_dir, tmp_path):
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4)
    stop_at(config, tmp_path, 2)
    warnings = []
    changed = from_dict({**to_dict(config), "max_train_steps": 5, "flip_p": 0.5})
    train(changed, tmp_path, resume=True, on_progress=lambda p: warnings.extend(p.warnings))
    assert [w for w in warnings if "changed since the run stopped" in w] == [
        "Resumed with options changed since the run stopped (used from here on): max_train_steps: 4 -> 5; "
        "flip_p: 0.0 -> 0.5"]


def test_progress_carries_each_steps_smoothed_loss_once_when_it_is_read(tiny_sd1, instance_dir, tmp_path):
    """The loss is read from the device every few steps; each step's smoothed value reaches the page then (a
    point per report would repeat the last read value, a staircase)."""
    seen = []
    _, result = train(make_config(tiny_sd1, instance_dir, max_train_steps=12), tmp_path,
                      on_progress=lambda p: seen.extend(p.losses))
    assert [step for step, _ in seen] == list(range(1, 13))
    smoothed, expected = None, []
    for _, value in result.losses:
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        expected.append(smoothed)
    assert [value for _, value in seen] == pytest.approx(expected)


def test_periodic_saves_and_samples(tiny_sd1, instance_dir, tmp_path):
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4, save_every_n_steps=2,
                         sample_every_n_steps=2, sample_steps=2, sample_prompts="photo of {token} {class}\nsecond")
    _, result = train(config, tmp_path)
    assert [p.name for p in result.checkpoints] == ["t_2.safetensors", "t_4.safetensors"]
    assert [p.name for p in result.samples] == ["step000002_0.png", "step000002_1.png",
                                                "step000004_0.png", "step000004_1.png"]
    assert Image.open(result.samples[0]).size == (64, 64)


def test_missing_class_images_are_generated_once(tiny_sd1, instance_dir, tmp_path):
    classes = tmp_path / "classes"
    config = make_config(tiny_sd1, instance_dir, classes, max_train_steps=1, class_image_steps=2,
                         concept={"num_class_images": 2})
    phases = []
    train_run, _ = train(config, tmp_path, on_progress=lambda p: phases.append(p.phase))
    made = sorted(p.name for p in classes.iterdir())
    assert made == ["class_00000.png", "class_00001.png"]
    assert "class_images" in phases
    before = {p: p.stat().st_mtime_ns for p in classes.iterdir()}
    phases.clear()
    train(from_dict({**to_dict(config), "project_name": "again"}), tmp_path)  # another run with the same classes
    assert {p: p.stat().st_mtime_ns for p in classes.iterdir()} == before
    assert "class_images" not in phases


def test_no_usable_images_fails_before_the_model_loads(tiny_sd1, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")

    class Host(FolderHost):
        def load_base(self, config):
            raise AssertionError("the model must not load when there are no images")

    with pytest.raises(DreamboothError, match=str(empty.name)):
        TrainingRun(make_config(tiny_sd1, empty), Host(tmp_path)).run()


def test_with_ema_the_average_is_exported(tiny_sd1, instance_dir, tmp_path, monkeypatch):
    from dreambooth_ext.train import run as run_module

    loops = []

    class Loop(run_module._Loop):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loops.append(self)

    monkeypatch.setattr(run_module, "_Loop", Loop)
    _, result = train(make_config(tiny_sd1, instance_dir, ema=True, ema_decay=0.5), tmp_path / "ema")
    exported = read_checkpoint(result.checkpoints[-1])[UNET + "input_blocks.0.0.weight"]
    loop = loops[-1]
    assert torch.equal(exported, loop.ema.shadow["conv_in.weight"])
    assert not torch.equal(exported, loop.bundle.unet.conv_in.weight.detach())  # not the raw weights


def test_text_encoder_training_and_its_stop_fraction(tiny_sd1, instance_dir, tmp_path):
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    base = read_checkpoint(tiny_sd1)[te]
    _, trained = train(make_config(tiny_sd1, instance_dir, train_text_encoder=True, text_encoder_lr=1e-3),
                       tmp_path / "a")
    assert not torch.equal(read_checkpoint(trained.checkpoints[-1])[te], base)
    _, frozen = train(make_config(tiny_sd1, instance_dir, train_text_encoder=True, text_encoder_lr=1e-3,
                                  stop_text_encoder=0.0), tmp_path / "b")
    assert torch.equal(read_checkpoint(frozen.checkpoints[-1])[te], base)


def test_latent_cache_does_not_change_the_result(tiny_sd1, instance_dir, tmp_path):
    cached = make_config(tiny_sd1, instance_dir, cache_latents=True, precompute_text_embeddings=True, flip_p=0.5)
    direct = make_config(tiny_sd1, instance_dir, cache_latents=False, precompute_text_embeddings=False,
                         flip_p=0.5)
    a = unet_of(train(cached, tmp_path / "a")[1].checkpoints[-1])
    b = unet_of(train(direct, tmp_path / "b")[1].checkpoints[-1])
    assert max_difference(a, b) < 1e-5


def test_progress_reports_step_loss_speed_and_eta(tiny_sd1, instance_dir, tmp_path):
    seen: list[Progress] = []
    train(make_config(tiny_sd1, instance_dir, max_train_steps=3), tmp_path, on_progress=seen.append)
    steps = [p for p in seen if p.phase == "training"]
    assert [p.step for p in steps] == [1, 2, 3]
    assert all(p.total_steps == 3 and p.loss > 0 and p.lr == 1e-3 and p.it_per_s > 0 for p in steps)
    assert steps[-1].eta_s == 0
    assert seen[-1].phase == "finished"


def test_options_that_change_the_math_run(tiny_sd1, instance_dir, class_dir, tmp_path):
    config = make_config(tiny_sd1, instance_dir, class_dir, max_train_steps=2, min_snr_gamma=5.0,
                         noise_offset=0.1, gradient_accumulation_steps=2, train_batch_size=2,
                         aspect_ratio_buckets=True, lr_scheduler="linear", crop="random", max_grad_norm=0.5)
    _, result = train(config, tmp_path)
    assert result.status == "finished"
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)


def test_8bit_adam_is_refused_clearly_where_unavailable(tiny_sd1, instance_dir, tmp_path):
    with pytest.raises(DreamboothError, match="adamw_8bit"):
        train(make_config(tiny_sd1, instance_dir, optimizer="adamw_8bit"), tmp_path)


def test_compile_unet_is_refused_before_loading_where_torch_cannot_compile_a_module(tiny_sd1, instance_dir, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.delattr(torch.nn.Module, "compile")  # torch before 2.2 (the WebUI's default is 2.1)
    host = FolderHost(tmp_path)
    host.load_base = lambda config: pytest.fail("the model loaded before the refusal")
    with pytest.raises(DreamboothError, match="compile_unet cannot be used: it needs torch 2.2 or newer"):
        TrainingRun(make_config(tiny_sd1, instance_dir, compile_unet=True), host).run()


def test_torch_before_2_4_trains_with_its_default_adamw_on_a_cpu_and_scales_fp16_losses(monkeypatch):
    """torch 2.1 (the WebUI's default) has the fused AdamW kernel for CUDA only, and fp16's loss scaler in
    torch.cuda.amp only."""
    from dreambooth_ext.train.optim import fused_adamw_runs, make_optimizer
    from dreambooth_ext.train.stepper import grad_scaler

    class OldAdamW(torch.optim.AdamW):  # torch 2.1 takes fused=True on the CPU and fails at the first step
        def step(self, closure=None):
            if self.defaults.get("fused"):
                raise NotImplementedError("Could not run 'aten::_fused_adamw_' with arguments from the 'CPU' "
                                          "backend.")
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", OldAdamW)
    fused_adamw_runs.cache_clear()
    try:
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = make_optimizer(from_dict({"optimizer": "adamw"}), [{"params": [weight], "lr": 0.1}],
                                   torch.device("cpu"))
        weight.grad = torch.ones(3)
        optimizer.step()
        assert not optimizer.defaults.get("fused") and weight.detach().lt(1).all()
    finally:
        fused_adamw_runs.cache_clear()
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)  # torch 2.1 has none to remove
    with pytest.warns((UserWarning, FutureWarning)):  # on this machine: no CUDA, and deprecated since 2.4
        assert isinstance(grad_scaler(), torch.cuda.amp.GradScaler)


def test_fp16_on_cpu_is_refused_with_the_fix(tiny_sd1, instance_dir, tmp_path):
    with pytest.raises(DreamboothError, match="bf16 or no"):
        train(make_config(tiny_sd1, instance_dir, mixed_precision="fp16", device="cpu"), tmp_path)


def test_bf16_autocast_on_cpu_trains(tiny_sd1, instance_dir, tmp_path):
    _, result = train(make_config(tiny_sd1, instance_dir, mixed_precision="bf16", max_train_steps=2), tmp_path)
    assert result.status == "finished"
    assert read_checkpoint(result.checkpoints[-1])[UNET + "out.2.weight"].dtype == torch.float32


def test_two_runs_in_one_process_do_not_share_state(tiny_sd1, instance_dir, tmp_path):
    config = make_config(tiny_sd1, instance_dir, max_train_steps=2)
    a = unet_of(train(config, tmp_path / "a")[1].checkpoints[-1])
    b = unet_of(train(config, tmp_path / "b")[1].checkpoints[-1])
    assert max_difference(a, b) == 0.0


def test_sd2_v_prediction_run_writes_the_yaml_the_webui_needs(instance_dir, tmp_path):
    base = save_tiny_checkpoint(tmp_path / "tiny_sd2.safetensors", family="sd2", seed=1)
    config = make_config(base, instance_dir, prediction_type="v_prediction", max_train_steps=2)
    _, result = train(config, tmp_path)
    path = result.checkpoints[-1]
    yaml_text = path.with_suffix(".yaml").read_text()
    assert 'parameterization: "v"' in yaml_text or "parameterization: v" in yaml_text
    trained = read_checkpoint(path)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in trained
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "v"


def test_a_prediction_type_against_what_the_checkpoint_states_is_said_in_the_warnings(instance_dir, tmp_path):
    base = save_tiny_checkpoint(tmp_path / "tiny_sd2.safetensors", family="sd2", seed=1)
    stated_v = train(make_config(base, instance_dir, prediction_type="v_prediction", max_train_steps=1),
                     tmp_path)[1].checkpoints[-1]  # its yaml and metadata say v
    for choice, said in (("epsilon", True), ("auto", False), ("v_prediction", False)):
        warnings = []
        config = make_config(stated_v, instance_dir, prediction_type=choice, max_train_steps=1, project_name=choice)
        train(config, tmp_path, on_progress=lambda p, seen=warnings: seen.extend(p.warnings))
        overridden = [w for w in warnings if w.startswith("prediction_type = epsilon overrides the checkpoint's "
                                                          "own v_prediction (from the .yaml beside the checkpoint)")]
        assert bool(overridden) == said, (choice, warnings)


def test_engine_never_imports_diffusers_pipelines():
    """The WebUI's transformers 4.30.2 cannot import diffusers' pipeline classes."""
    import subprocess
    import sys

    code = ("import sys, dreambooth_ext.cli, dreambooth_ext.train.run\n"
            "from dreambooth_ext.models.bundle import load_bundle\n"
            "from dreambooth_ext.models.tiny import tiny_checkpoint\n"
            "load_bundle(tiny_checkpoint())\n"
            "print([m for m in sys.modules if m.startswith('diffusers.pipelines')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"  # the last line: DeepSpeed, when installed, logs to stdout


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    from dreambooth_ext.train.state import TrainingState, load_state, save_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    scaler = {"scale": 1024.0, "growth_factor": 2.0, "_growth_tracker": 3}
    save_state(tmp_path / "state", TrainingState(step=7, weights={"w": torch.ones(2)}, ema=None,
                                                 optimizer=optimizer.state_dict(),
                                                 lr_scheduler=scheduler.state_dict(), scaler=scaler,
                                                 meta={"project": "p"}))
    loaded = load_state(tmp_path / "state")
    original = optimizer.state_dict()
    assert loaded.step == 7 and loaded.scaler == scaler and loaded.meta["project"] == "p"
    assert loaded.optimizer["param_groups"] == original["param_groups"]  # tuples (betas) and all
    assert loaded.optimizer["state"].keys() == original["state"].keys()  # integer keys stay integers
    for index, values in original["state"].items():
        for name, tensor in values.items():
            assert torch.equal(loaded.optimizer["state"][index][name], tensor), (index, name)
    assert loaded.lr_scheduler == scheduler.state_dict()
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(loaded.optimizer)  # torch accepts it as its own


def test_an_old_pickled_state_gets_a_clear_message(tmp_path):
    from dreambooth_ext.train.state import load_state

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text('{"format": 1, "step": 3}')
    with pytest.raises(DreamboothError, match="older version.*without resume"):
        load_state(tmp_path / "state")


def test_ema_warms_up_like_diffusers():
    from dreambooth_ext.train.ema import EMA, warmed_up_decay

    assert warmed_up_decay(0.9999, 1) == 0.0 and warmed_up_decay(0.9999, 2) == pytest.approx(2 / 11)
    assert warmed_up_decay(0.9, 10_000) == 0.9
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    ema = EMA(layer, 0.9999)
    expected = 0.0
    for step in range(1, 1001):  # the weight walks from 0 to 1 over the run
        with torch.no_grad():
            layer.weight.fill_(step / 1000)
        ema.update(layer)
        keep = warmed_up_decay(0.9999, step)
        expected = keep * expected + (1 - keep) * step / 1000
    averaged = float(ema.shadow["weight"])
    assert averaged == pytest.approx(expected, rel=1e-4)
    assert averaged > 0.85  # without the warm-up: about 0.05, still 95 % the start


def test_samples_show_the_ema_weights(tiny_sd1, instance_dir, tmp_path, monkeypatch):
    from dreambooth_ext.train import run as run_module

    seen = []
    real = run_module.generate_images

    def spy(bundle, *args, **kwargs):
        seen.append(bundle.unet.conv_in.weight.detach().clone())
        return real(bundle, *args, **kwargs)

    monkeypatch.setattr(run_module, "generate_images", spy)
    holder = {}
    config = make_config(tiny_sd1, instance_dir, max_train_steps=3, ema=True, ema_decay=0.5, sample_every_n_steps=3,
                         sample_steps=1, sample_prompts="photo of {token} {class}")
    real_loop = run_module._Loop

    class Loop(real_loop):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            holder["loop"] = self

        def _sample(self, step):
            holder["ema"] = self.ema.shadow["conv_in.weight"].clone()
            holder["raw"] = self.bundle.unet.conv_in.weight.detach().clone()
            super()._sample(step)

    monkeypatch.setattr(run_module, "_Loop", Loop)
    train(config, tmp_path)
    assert torch.equal(seen[-1], holder["ema"]) and not torch.equal(holder["ema"], holder["raw"])
    assert torch.equal(holder["loop"].bundle.unet.conv_in.weight.detach(), holder["raw"])  # trained ones back


def test_resume_uses_the_new_optimizer_options_and_says_so(tiny_sd1, instance_dir, tmp_path, caplog):
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4, learning_rate=1e-3, weight_decay=0.01)
    holder = {}

    def stop_at_2(p):
        if p.phase == "training" and p.step == 2:
            holder["run"].cancel()

    run = TrainingRun(config, FolderHost(tmp_path / "models"), on_progress=stop_at_2)
    holder["run"] = run
    run.run()
    changed = make_config(tiny_sd1, instance_dir, max_train_steps=4, learning_rate=5e-4, weight_decay=0.1,
                          adam_beta1=0.8)
    lrs = []
    with caplog.at_level("INFO", logger="dreambooth_ext"):
        result = train(changed, tmp_path, resume=True, on_progress=lambda p: p.lr is not None and lrs.append(p.lr))[1]
    assert result.status == "finished"
    assert lrs and all(lr == pytest.approx(5e-4) for lr in lrs)  # constant schedule at the new rate
    text = caplog.text
    assert "learning_rate: 0.001 -> 0.0005" in text and "weight_decay: 0.01 -> 0.1" in text
    assert "adam_beta1, adam_beta2: (0.9, 0.999) -> (0.8, 0.999)" in text
    meta = json.loads(read_metadata(result.checkpoints[-1])["dreambooth.config"])
    assert meta["learning_rate"] == 5e-4  # the metadata records what was used


def read_metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_resume_with_the_text_encoder_switched_off_is_a_clear_error(tiny_sd1, instance_dir, tmp_path):
    config = make_config(tiny_sd1, instance_dir, max_train_steps=4, train_text_encoder=True)
    holder = {}

    def stop_at_1(p):
        if p.phase == "training" and p.step == 1:
            holder["run"].cancel()

    holder["run"] = TrainingRun(config, FolderHost(tmp_path / "models"), on_progress=stop_at_1)
    holder["run"].run()
    with pytest.raises(DreamboothError, match="made with train_text_encoder on; a resumed run must keep it on"):
        train(make_config(tiny_sd1, instance_dir, max_train_steps=4), tmp_path, resume=True)


@pytest.mark.parametrize("scheduler, option, value", [("cosine_with_restarts", "lr_num_cycles", 3),
                                                      ("polynomial", "lr_power", 3.0)])
def test_restart_cycles_and_polynomial_power_shape_the_schedule(scheduler, option, value):
    from dreambooth_ext.train.optim import make_lr_scheduler

    def rates(**overrides):
        config = make_config(Path("base.safetensors"), Path("photos"), lr_scheduler=scheduler, learning_rate=1.0,
                             **overrides)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = make_lr_scheduler(config, optimizer, 30)
        out = []
        for _ in range(30):
            out.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return out

    plain, shaped = rates(), rates(**{option: value})
    assert plain != pytest.approx(shaped)
    if option == "lr_num_cycles":
        assert sum(1 for a, b in zip(shaped[:-1], shaped[1:], strict=True) if b > a + 0.5) == value - 1  # restarts
    else:
        assert shaped[10] < plain[10]  # a higher power falls faster at first


def test_every_concept_reaches_the_metadata_and_the_samples(tiny_sd1, instance_dir, tmp_path):
    from dreambooth_ext.config import from_concepts_list

    imported = from_concepts_list([
        {"instance_prompt": f"photo of {token} toy", "class_prompt": "photo of toy",
         "instance_data_dir": str(instance_dir)} for token in ("zwx", "ukj")])
    config = make_config(tiny_sd1, instance_dir, max_train_steps=1, sample_every_n_steps=1, sample_steps=1,
                         concept={"token": "x"})
    config = type(config)(**{**config.__dict__, "concepts": imported.concepts, "prior_preservation": False})
    _, result = train(config, tmp_path)
    concepts = json.loads(read_metadata(result.checkpoints[-1])["dreambooth.concepts"])
    assert [(c["token"], c["class_word"], c["instance_prompt"]) for c in concepts] == [
        ("zwx", "toy", "photo of zwx toy"), ("ukj", "toy", "photo of ukj toy")]
    assert len(result.samples) == 2  # "photo of {token} {class}" for each concept


def test_the_small_model_declares_its_size_so_the_demo_does_not_warn_about_itself(tiny_sd1, instance_dir,
                                                                                   tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dreambooth_ext"):
        train(make_config(tiny_sd1, instance_dir, max_train_steps=1), tmp_path)
    assert "a model made for" not in caplog.text
    warnings = []
    with caplog.at_level("WARNING", logger="dreambooth_ext"):
        train(make_config(tiny_sd1, instance_dir, max_train_steps=1, resolution=128), tmp_path / "b",
              on_progress=lambda p: warnings.extend(p.warnings))
    assert "Training at 128px a model made for 64px" in caplog.text  # a real mismatch is still said
    assert any(w.startswith("Training at 128px a model made for 64px (sd1, epsilon)") for w in warnings)  # in the tab


@pytest.mark.parametrize("cache_latents", [True, False])
def test_nan_latents_stop_the_run_naming_the_picture(tiny_sd1, instance_dir, tmp_path, monkeypatch, cache_latents):
    from diffusers import AutoencoderKL

    real_encode = AutoencoderKL.encode

    def overflowing(self, pixels, *args, **kwargs):
        out = real_encode(self, pixels, *args, **kwargs)
        out.latent_dist.mean[:] = float("nan")  # what an fp16 overflow of the VAE looks like
        return out

    monkeypatch.setattr(AutoencoderKL, "encode", overflowing)
    with pytest.raises(DreamboothError, match=r"img\d\.png into NaN/inf latents.*mixed_precision"):
        train(make_config(tiny_sd1, instance_dir, max_train_steps=1, cache_latents=cache_latents), tmp_path)


def test_pictures_read_ahead_in_a_thread_are_the_ones_the_step_reads(tiny_sd1, instance_dir, tmp_path,
                                                                     monkeypatch):
    """Without a latent cache (random crops need a new crop every step), the next step's pictures are read in a
    thread of their own while a step trains; the result equals reading each picture when its step comes."""
    import threading

    from dreambooth_ext.train import batches

    readers = set()
    read = batches.prepare_picture

    def recording(*args, **kwargs):
        readers.add(threading.current_thread().name)
        return read(*args, **kwargs)

    monkeypatch.setattr(batches, "prepare_picture", recording)
    config = make_config(tiny_sd1, instance_dir, max_train_steps=3, crop="random", flip_p=0.5)
    ahead = unet_of(train(config, tmp_path / "ahead")[1].checkpoints[-1])
    assert any(name.startswith("dreambooth-pictures") for name in readers)
    monkeypatch.setattr(batches.Feeder, "prefetch", lambda self, indices, micro: None)
    readers.clear()
    inline = unet_of(train(config, tmp_path / "inline")[1].checkpoints[-1])
    assert not any(name.startswith("dreambooth-pictures") for name in readers)
    assert max_difference(ahead, inline) == 0.0


def test_a_concept_without_images_is_reported_and_gets_no_class_images(tiny_sd1, instance_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    concepts = [{"instance_dir": str(folder), "token": token, "class_word": "toy", "num_class_images": 3}
                for folder, token in ((instance_dir, "ohwx"), (empty, "zwx"))]
    config = make_config(tiny_sd1, instance_dir, max_train_steps=1, prior_preservation=True, class_image_steps=2,
                         concepts=concepts)
    seen: list[Progress] = []
    result = train(config, tmp_path, on_progress=seen.append)[1]
    assert result.status == "finished"
    check = next(p for p in seen if p.phase == "checking")
    assert check.message == "Dataset check: 1 warning(s)"
    assert [w for w in check.warnings if "will not be trained" in w] == [
        f"concept 2: no usable images in {str(empty)!r}, so it will not be trained (and no class images are made "
        "for it). Add its photos to that folder, or remove the concept."]
    assert max(p.total or 0 for p in seen if p.phase == "class_images") == 3  # concept 1's only
    made = sorted(p.name for p in (tmp_path / "models" / "dreambooth" / "t" / "class_images").iterdir())
    assert len(made) == 1 and made[0].startswith("0_")
