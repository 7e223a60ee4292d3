"""The memory options change what they should and nothing else: a fused backward pass takes the same steps as the
plain one, Adafactor and bf16 weights train, Adafactor's state stays small for convolutions, stochastic rounding
is unbiased, resume works with each."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from ui_helpers import run_until_cancelled

from dreambooth_ext.config import ConfigError, from_dict, validate
from dreambooth_ext.hosts.files import FolderHost
from dreambooth_ext.models.checkpoint import read_checkpoint
from dreambooth_ext.models.tiny import save_tiny_checkpoint
from dreambooth_ext.train.adafactor import MatrixAdafactor
from dreambooth_ext.train.run import TrainingRun
from dreambooth_ext.train.stepper import stochastic_round_to_bf16

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny.safetensors", "sd1", seed=3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(3):
        image = Image.new("RGB", (64, 64), (60 * i, 120, 200 - 50 * i))
        image.paste((250, 250, 0), (8 + 6 * i, 12, 40, 44))
        image.save(folder / f"img{i}.png")
    return folder


def config(base: Path, photos: Path, **overrides):
    data = {"project_name": "mem", "base_model": str(base), "max_train_steps": 3, "learning_rate": 1e-3,
            "text_encoder_lr": 1e-3, "seed": 9, "prior_preservation": False, "save_precision": "fp32",
            "max_grad_norm": 0.0, "gradient_checkpointing": False,
            "concepts": [{"instance_dir": str(photos), "token": "zwx", "class_word": "toy"}]}
    data.update(overrides)
    return from_dict(data)


def trained(cfg, root: Path) -> dict[str, torch.Tensor]:
    result = TrainingRun(cfg, FolderHost(root)).run()
    return read_checkpoint((result.checkpoints or result.loras)[-1])


def difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_a_fused_backward_takes_the_same_steps(base, photos, tmp_path, optimizer):
    options = {"optimizer": optimizer, "train_text_encoder": True, "lr_scheduler": "linear", "lr_warmup_steps": 1}
    plain = trained(config(base, photos, **options), tmp_path / "plain")
    fused = trained(config(base, photos, fused_backward=True, **options), tmp_path / "fused")
    assert difference(plain, read_checkpoint(base)) > 1e-4  # it trained
    assert difference(fused, plain) < 1e-5


def test_a_fused_backward_with_gradient_accumulation_steps_once_per_step(base, photos, tmp_path):
    options = {"gradient_accumulation_steps": 2, "max_train_steps": 2}
    plain = trained(config(base, photos, **options), tmp_path / "plain")
    fused = trained(config(base, photos, fused_backward=True, **options), tmp_path / "fused")
    assert difference(fused, plain) < 1e-5


def test_a_fused_lora_run_resumes_exactly(base, photos, tmp_path):
    cfg = config(base, photos, train_mode="lora", lora_rank=4, fused_backward=True, max_train_steps=4,
                 lora_learning_rate=1e-2, optimizer="adafactor")
    straight = trained(cfg, tmp_path / "straight")
    host = FolderHost(tmp_path / "stopped")
    assert run_until_cancelled(cfg, host, 2).status == "cancelled"
    resumed = read_checkpoint(TrainingRun(cfg, host, resume=True).run().loras[-1])
    assert difference(resumed, straight) < 1e-6


def adafactor_steps(optimizer_class, weights: list[torch.Tensor], steps: int = 3, state: dict | None = None):
    """`steps` Adafactor steps (the run's settings) on copies of `weights` with fixed gradients; the new weights and
    the optimizer."""
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = optimizer_class(params, lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False,
                                beta1=None, weight_decay=1e-2)
    if state is not None:
        optimizer.load_state_dict(copy.deepcopy(state))  # loading keeps the saved tensors: they would change
    for step in range(steps):
        for i, param in enumerate(params):
            param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(10 * step + i))
        optimizer.step()
    return [p.detach() for p in params], optimizer


def test_adafactor_factors_a_convolution_as_a_matrix():
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    conv, linear, bias = torch.randn(64, 32, 3, 3), torch.randn(48, 32), torch.randn(64)
    ours, optimizer = adafactor_steps(MatrixAdafactor, [conv, linear, bias])
    theirs, _ = adafactor_steps(Adafactor, [conv, linear, bias])
    state = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    # One statistic per output channel and one per input position: 64 + 288 numbers, not 2 x 64 x 32 x 3.
    assert state[0]["exp_avg_sq_row"].shape == (64,) and state[0]["exp_avg_sq_col"].shape == (288,)
    assert torch.equal(ours[1], theirs[1]) and torch.equal(ours[2], theirs[2])  # the rest as transformers does it
    assert 1e-4 < float((ours[0] - conv).abs().mean()) and float((ours[0] - theirs[0]).abs().max()) > 1e-6


def test_the_adafactor_option_keeps_a_small_state_for_a_convolution(base, photos):
    from dreambooth_ext.train.optim import make_optimizer

    conv = torch.nn.Parameter(torch.randn(64, 32, 3, 3))
    conv.grad = torch.randn_like(conv)
    optimizer = make_optimizer(config(base, photos, optimizer="adafactor"),
                               [{"params": [conv], "lr": 1e-3, "weight_decay": 0.0}], torch.device("cpu"))
    optimizer.step()
    held = sum(v.numel() for v in optimizer.state[conv].values() if isinstance(v, torch.Tensor))
    assert held < 400  # 64 + 288 statistics (factored over the last two dimensions: 12,288)


def test_adafactor_continues_a_state_saved_by_transformers_adafactor():
    from transformers.optimization import Adafactor

    conv = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(1))
    _, old = adafactor_steps(Adafactor, [conv], steps=1)
    continued, optimizer = adafactor_steps(MatrixAdafactor, [conv], steps=2, state=old.state_dict())
    assert next(iter(optimizer.state.values()))["exp_avg_sq_row"].shape == (32, 16, 3)  # kept as it was saved
    theirs, _ = adafactor_steps(Adafactor, [conv], steps=2, state=old.state_dict())
    assert torch.equal(continued[0], theirs[0])


def test_stochastic_rounding_is_unbiased_on_average():
    low = torch.tensor(1.0, dtype=torch.bfloat16)
    step = float(torch.nextafter(low, torch.tensor(2.0, dtype=torch.bfloat16))) - 1.0  # the bf16 spacing at 1
    values = torch.full((200_000,), 1.0 + 0.3 * step)  # 30 % of the way to the next bf16 number
    rounded = stochastic_round_to_bf16(values, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + step}  # always one of the two neighbours
    assert abs(float((rounded == 1.0 + step).float().mean()) - 0.3) < 0.01
    assert abs(float(rounded.mean()) - float(values.mean())) < 0.01 * step
    assert float(values.to(torch.bfloat16).float().mean()) == 1.0  # round-to-nearest loses the update entirely
    exact = torch.tensor([0.5, -2.0, 3.0])  # representable values stay as they are
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)


def test_bf16_weights_train_and_are_saved(base, photos, tmp_path):
    cfg = config(base, photos, weights_dtype="bf16", mixed_precision="bf16", fused_backward=True,
                 learning_rate=1e-4)
    weights = trained(cfg, tmp_path)
    start = read_checkpoint(base)
    moved = [k for k in start if k.startswith(UNET) and not torch.equal(weights[k], start[k].bfloat16().float())]
    assert len(moved) > 50  # updates of 1e-4 survive bf16 storage: rounded stochastically, not to nearest
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_memory_options_that_cannot_work_together_are_refused(base, photos):
    with pytest.raises(ConfigError) as info:
        validate(config(base, photos, fused_backward=True, max_grad_norm=1.0, mixed_precision="fp16",
                        weights_dtype="bf16"))
    text = str(info.value)
    assert "set max_grad_norm to 0" in text and "use mixed_precision bf16" in text
    assert "weights_dtype = bf16 with mixed_precision = fp16" in text


def test_a_compiled_unet_trains_like_the_plain_one(base, photos, tmp_path, monkeypatch):
    from dreambooth_ext.train import trained as kinds

    monkeypatch.setattr(kinds, "COMPILE_BACKEND", "aot_eager")  # the same graph capture, without a C++ build
    class Keeping(FolderHost):
        def load_base(self, cfg):
            self.bundle = super().load_base(cfg)
            return self.bundle

    # adam_epsilon well above the float noise of gradients that are zero in exact arithmetic (a bias before a
    # GroupNorm): Adam would scale that noise up to the learning rate, and a compiled graph (torch 2.1) sums in
    # another order; the real gradients agree to about 1e-6
    options = {"max_train_steps": 2, "adam_epsilon": 1e-4}
    plain = trained(config(base, photos, **options), tmp_path / "plain")
    host = Keeping(tmp_path / "compiled")
    result = TrainingRun(config(base, photos, compile_unet=True, **options), host).run()
    assert host.bundle.unet._compiled_call_impl is not None  # it ran compiled
    compiled = read_checkpoint(result.checkpoints[-1])
    assert difference(compiled, plain) < 1e-5 and difference(plain, read_checkpoint(base)) > 1e-4


def test_progress_shows_the_memory_in_use(base, photos, tmp_path):
    from dreambooth_ext.hosts.webui import describe_progress
    from dreambooth_ext.ui import render
    from dreambooth_ext.ui.jobs import JobStatus

    seen = []
    TrainingRun(config(base, photos, max_train_steps=2), FolderHost(tmp_path), on_progress=seen.append).run()
    steps = [p for p in seen if p.phase == "training"]
    assert steps and all(p.memory_gib > 0.05 and p.memory_kind == "RAM" for p in steps)  # a CPU run: its RAM
    status = JobStatus(project="mem", state="running")
    status.apply(steps[-1])
    shown = render.status_html(status.to_dict())
    assert f"{steps[-1].memory_gib:.1f} GiB RAM" in shown and "it/s" in shown
    assert "GiB RAM" in describe_progress(steps[-1])  # the host's progress bar too


def test_the_lowest_memory_preset_is_a_valid_config_that_sets_each_lever(base, photos):
    from dreambooth_ext.config import LOWEST_MEMORY, OPTIONS_BY_NAME, to_dict

    cfg = validate(config(base, photos, **LOWEST_MEMORY))  # the options it sets work together
    assert cfg.fused_backward and cfg.weights_dtype == "bf16" and cfg.optimizer == "adafactor"
    assert all(name in OPTIONS_BY_NAME for name in LOWEST_MEMORY)
    assert {k: to_dict(cfg)[k] for k in LOWEST_MEMORY} == LOWEST_MEMORY


def test_the_tab_sets_the_lowest_memory_preset(tmp_path):
    from ui_helpers import make_models_dir

    from dreambooth_ext.config import LOWEST_MEMORY
    from dreambooth_ext.ui import JobManager, folder_adapter
    from dreambooth_ext.ui.tab import build_tab

    tab = build_tab(folder_adapter(make_models_dir(tmp_path), tmp_path / "work"), JobManager(), concept_slots=1)
    updates = tab.lowest_memory()
    assert [u["value"] for u in updates] == list(LOWEST_MEMORY.values())
    wired = [d for d in tab.blocks.config["dependencies"] if tab.lowest_memory_button._id in
             [t[0] if isinstance(t, (list, tuple)) else t for t in d.get("targets", [])]]
    assert wired and wired[0]["outputs"] == [tab.widgets[name]._id for name in LOWEST_MEMORY]


def test_gradient_checkpointing_auto_is_on_for_a_gpu_and_off_on_a_cpu(base, photos, tmp_path):
    from dreambooth_ext.cli import build_parser, config_from_args
    from dreambooth_ext.train.trained import checkpointing

    auto = config(base, photos, gradient_checkpointing="auto")
    assert checkpointing(auto, torch.device("cuda", 0)) and not checkpointing(auto, torch.device("cpu"))
    for value, expected in ((True, "on"), ("false", "off"), ("on", "on")):  # older project files said true/false
        assert config(base, photos, gradient_checkpointing=value).gradient_checkpointing == expected
    flag = config_from_args(build_parser().parse_args(["train", "--gradient_checkpointing"]))
    assert flag.gradient_checkpointing == "on"  # a bare flag turns it on, as it did
    with pytest.raises(ConfigError, match="gradient_checkpointing = 'maybe': must be one of auto, on, off"):
        config(base, photos, gradient_checkpointing="maybe")

    class Keeping(FolderHost):
        def load_base(self, cfg):
            self.bundle = super().load_base(cfg)
            return self.bundle

    for value, expected in (("auto", False), ("on", True)):  # what a run on this CPU does with each
        host = Keeping(tmp_path / value)
        TrainingRun(config(base, photos, max_train_steps=1, gradient_checkpointing=value), host).run()
        assert host.bundle.unet.is_gradient_checkpointing is expected


def test_placing_a_module_in_another_dtype_gives_its_own_tensors_back():
    from dreambooth_ext.train.sampling import placed

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    before = {name: (t.data_ptr(), t.clone()) for name, t in module.state_dict().items()}
    with placed([module], torch.device("cpu"), torch.bfloat16):
        assert module[0].weight.dtype == torch.bfloat16
    for name, tensor in module.state_dict().items():
        assert tensor.data_ptr() == before[name][0] and torch.equal(tensor, before[name][1])  # no rounded copy


def test_a_bf16_run_leaves_the_frozen_parts_as_loaded(base, photos, tmp_path):
    """Caching latents and captions in bf16 must not leave the VAE and text encoder bf16-rounded fp32 copies of
    their weights (a second copy beside the loaded file's tensors, rounded samples)."""

    class Keeping(FolderHost):
        def load_base(self, cfg):
            self.bundle = super().load_base(cfg)
            frozen = (self.bundle.vae, *self.bundle.text_encoders)
            self.before = [{n: (t.data_ptr(), t.clone()) for n, t in m.state_dict().items()} for m in frozen]
            return self.bundle

    host = Keeping(tmp_path)
    TrainingRun(config(base, photos, mixed_precision="bf16", max_train_steps=1, sample_every_n_steps=1,
                       sample_steps=1), host).run()
    for module, before in zip((host.bundle.vae, *host.bundle.text_encoders), host.before, strict=True):
        for name, tensor in module.state_dict().items():
            assert tensor.dtype == before[name][1].dtype and torch.equal(tensor, before[name][1]), name
            assert tensor.data_ptr() == before[name][0], name


@pytest.mark.parametrize("mixed_precision, train_text_encoder", [("no", False), ("bf16", True)])
def test_a_fp16_checkpoint_trains_as_its_values_in_fp32(photos, tmp_path, mixed_precision, train_text_encoder):
    """The VAE and text encoders keep a fp16 file's own tensors (no fp32 copies of frozen parts), the base lets go
    of the fp16 UNet the trained one replaces, and every result is the one those values give stored in fp32: the
    class images they render, the cached latents and captions, the trained weights (a text encoder that trains
    becomes fp32) and the samples."""
    import safetensors.torch

    class Keeping(FolderHost):
        def load_base(self, cfg):
            self.bundle = super().load_base(cfg)
            return self.bundle

    from dreambooth_ext.models.export import MODEL_PARTS

    loaded = read_checkpoint(save_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1", seed=3))
    assert any(k.startswith(MODEL_PARTS[1:]) for k in loaded)
    results = {}
    for dtype in (torch.float16, torch.float32):
        root = tmp_path / str(dtype)
        path = root / "base.safetensors"
        root.mkdir()
        stored = {k: v.half().to(dtype) if k.startswith(MODEL_PARTS) else v for k, v in loaded.items()}
        safetensors.torch.save_file(stored, str(path))
        cfg = config(path, photos, mixed_precision=mixed_precision, train_text_encoder=train_text_encoder,
                     resolution=64, max_train_steps=2, prior_preservation=True, class_image_steps=1,
                     sample_every_n_steps=2, sample_steps=1,
                     concepts=[{"instance_dir": str(photos), "class_dir": str(root / "classes"), "token": "zwx",
                                "class_word": "toy", "num_class_images": 2}])
        host = Keeping(root)
        result = TrainingRun(cfg, host).run()
        assert not any(k.startswith(UNET) and v.dtype == torch.float16 for k, v in host.bundle.base.items())
        frozen = [host.bundle.vae] + ([] if train_text_encoder else list(host.bundle.text_encoders))
        assert {p.dtype for m in frozen for p in m.parameters()} == {dtype}  # as loaded, after every use
        pictures = [Image.open(p).tobytes() for p in (*sorted((root / "classes").iterdir()), *result.samples)]
        results[dtype] = read_checkpoint(result.checkpoints[-1]), pictures
    (half, half_pictures), (full, full_pictures) = results[torch.float16], results[torch.float32]
    assert difference(full, loaded) > 1e-4  # it trained
    assert len(full_pictures) == 3 and half_pictures == full_pictures
    assert half.keys() == full.keys() == loaded.keys() and all(torch.equal(half[k], full[k]) for k in full)


def gradients_of(model: torch.nn.Module, out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weights' gradients of a squared-mean loss on `out`, taken off the model."""
    out.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_bf16_autocast_recasts_weights_in_backward_with_the_same_gradients():
    """The casts autograd would keep for the backward pass are made again there: same gradients, and the forward
    pass's bf16 copies of the weights are gone once it ends."""
    import weakref

    from dreambooth_ext.train import autocast as recasting

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Flatten(2),
                                torch.nn.Linear(64, 48), torch.nn.Linear(48, 8, bias=False))
    x = torch.randn(2, 4, 8, 8)
    weights = {id(p) for p in (model[0].weight, model[3].weight, model[4].weight)}

    def gradients(recast: bool) -> tuple[dict, int]:
        packed = []
        pack = recasting._pack

        def counting(tensor):
            saved = pack(tensor)
            if not isinstance(saved, torch.Tensor):
                assert id(saved[0]) in weights
                packed.append(weakref.ref(tensor))
            return saved

        recasting._pack = counting
        try:
            with recasting.autocast("cpu", torch.bfloat16, recast=recast):
                out = model(x)
        finally:
            recasting._pack = pack
        assert out.dtype == torch.bfloat16
        assert all(ref() is None for ref in packed)  # no bf16 copy of a weight outlives the forward pass
        return gradients_of(model, out), len(packed)

    plain, none_packed = gradients(recast=False)
    recast, packed = gradients(recast=True)
    assert none_packed == 0 and packed == 3  # each weight's cast, the linear ones saved as transposed views
    assert all(torch.equal(plain[name], recast[name]) for name in plain)
    assert all(p.grad is None for p in model.parameters())


def test_mixed_precision_auto_is_bf16_on_a_cpu_that_computes_it(monkeypatch):
    from dreambooth_ext.train import devices

    monkeypatch.setattr(devices, "cpu_trains_bf16", lambda: True)
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(devices, "cpu_computes_bf16", lambda native=native: native)
        assert devices.resolve_precision("auto", torch.device("cpu")).autocast_dtype == expected
        assert devices.resolve_precision("no", torch.device("cpu")).autocast_dtype is None
        assert devices.resolve_precision("auto", torch.device("cpu"), deepspeed=True).autocast_dtype is None
    assert devices.resolve_precision("auto", torch.device("cuda", 0)).autocast_dtype == torch.float16


def test_bf16_on_the_cpu_is_refused_under_a_torch_whose_attention_crashes_in_it(monkeypatch):
    from torch.torch_version import TorchVersion

    from dreambooth_ext.errors import DreamboothError
    from dreambooth_ext.train import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_computes_bf16", lambda: True)
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.1.2+cu121"))  # the WebUI v1.10.1's
    with pytest.raises(DreamboothError, match="torch 2.2 or newer.*mixed_precision = no"):
        devices.resolve_precision("bf16", cpu)
    assert devices.resolve_precision("auto", cpu).autocast_dtype is None
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.2.0"))
    assert devices.resolve_precision("bf16", cpu).autocast_dtype == torch.bfloat16
    assert devices.resolve_precision("auto", cpu).autocast_dtype == torch.bfloat16


def test_the_recast_gives_the_same_gradients_inside_gradient_checkpointing(base):
    """Every GPU run checkpoints by default, and the checkpoint has saved-tensor hooks of its own."""
    from dreambooth_ext.models.bundle import load_bundle_from_file
    from dreambooth_ext.train.autocast import autocast

    unet = load_bundle_from_file(str(base)).unet
    unet.train()
    unet.enable_gradient_checkpointing()
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    context = torch.randn(2, 77, unet.config.cross_attention_dim)

    def gradients(recast: bool) -> dict:
        with autocast("cpu", torch.bfloat16, recast=recast):
            out = unet(x, t, context).sample
        return gradients_of(unet, out)

    plain, recast = gradients(False), gradients(True)
    assert unet.is_gradient_checkpointing
    assert all(torch.equal(plain[name], recast[name]) for name in plain)


class WatchedHost(FolderHost):
    """A folder host that watches the model it hands the run: is it freed, and freed before the host's own model
    comes back to the device (restore_device)? `fail_at` makes its progress report raise at that stage."""

    def __init__(self, root: Path, fail_at: str | None = None):
        super().__init__(root)
        self.unet = None
        self.freed_at_restore = None
        self.fail_at = fail_at

    def load_base(self, config):
        import weakref

        bundle = super().load_base(config)
        self.unet = weakref.ref(bundle.unet)
        return bundle

    def report(self, progress) -> None:
        if progress.phase == self.fail_at:
            raise RuntimeError(f"failing at {progress.phase}")
        super().report(progress)

    def restore_device(self) -> None:
        self.freed_at_restore = self.unet is not None and self.unet() is None
        super().restore_device()


@pytest.mark.parametrize("fail_at", [None, "training"], ids=["finished", "failed"])
def test_an_ended_run_frees_its_model_before_the_host_gets_the_device_back(base, photos, tmp_path, fail_at):
    """Seen in a real Forge: each run left its model in memory (2.9 -> 7.5 GiB over four short LoRA runs) until
    something collected its reference cycles; the automatic collection is off here, as it may not come for long."""
    import gc

    host = WatchedHost(tmp_path, fail_at)
    enabled = gc.isenabled()
    gc.disable()
    try:
        run = TrainingRun(config(base, photos, train_mode="lora"), host)
        if fail_at:
            with pytest.raises(RuntimeError, match="failing at"):
                run.run()
        else:
            run.run()
    finally:
        if enabled:
            gc.enable()
    assert host.unet is not None and host.freed_at_restore, "the run's model was alive when the host got it back"
