"""Memory accounting of a full fine-tune on real model shapes, measured on the CPU, with the GPU figure it implies.

For each combination of memory options, a run of a few steps on an SD1.5-shaped model (its real 860M-weight UNet,
random weights) at 512 px, batch 1 + 1 class image, gradient checkpointing on, in a process of its own:
  - trained weights, optimizer state: summed from the run's own tensors after its first step;
  - what a step holds besides them (activations, gradients, temporaries), two ways: resident, the process's
    resident-memory high-water mark during the later steps minus its memory at their start, freed heap memory
    handed back first (it also counts the CPU allocator's cached blocks and oneDNN's scratch memory, which a GPU
    run does not have: an upper bound); tensors, the tensors alive at one more step's peak, counted by torch's
    MemTracker (the tensor-level view a GPU's caching allocator serves; it agrees with the bytes autograd saves
    for backward);
  - expected GPU peak = trained weights + optimizer state + that + 0.5 GB (CUDA context). The VAE and text
    encoder are not counted: with latents and captions cached they leave the GPU before training. Activations are
    measured in fp32 where the run computes in fp32; each figure is also shown with them at half (what bf16
    autocast keeps), and the goal is judged on the tensors with bf16 activations.
8-bit AdamW runs only on CUDA; its row is the fp32 AdamW row with 2 bytes of state per weight instead of 8. bf16
compute is emulated (very slow) on CPUs without AVX-512 BF16, so unless --measure-bf16 is given, the bf16-weights
row is the fused row with the weights' bytes halved (its activations stay those of the fp32 run: an upper bound).

SDXL (`--model sdxl`): its real 2.6B-weight UNet alone (latents and text embeddings are random tensors of the
cached shapes, as in bench/gpu.py), fp32 everywhere, gradient checkpointing on, at --resolution (the fp32
weights alone are 10.3 GB: 24 GB of RAM does not hold a full fp32 AdamW run). Measured: Adafactor + fused
backward, and LoRA rank 16; computed from them: bf16 weights (the trained weights' and, for LoRA, the frozen
base's bytes halved). The same two figures as for SD1.5, with activations scaled to 1024 px by the latent area
(gradients are not: they do not grow with the picture).

    python bench/memory.py [--resolution 512] [--steps 3] [--measure-bf16]   (about 20 minutes on 2 CPU cores)
    python bench/memory.py --model sdxl [--resolution 512] [--steps 3]      (about an hour)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import _peak_mib, _reset_peak  # noqa: E402

GB = 1e9  # the goals are in GB
CUDA_CONTEXT = 0.5 * GB
FP32 = {"mixed_precision": "no"}  # computed in fp32 on every CPU (auto is bf16 on one that computes it natively)
COMBINATIONS = {
    "fp32 AdamW": {**FP32},
    "Adafactor": {**FP32, "optimizer": "adafactor"},
    "Adafactor + fused backward": {**FP32, "optimizer": "adafactor", "fused_backward": True, "max_grad_norm": 0.0},
    "bf16 weights (stochastic rounding) + Adafactor + fused backward": {
        "optimizer": "adafactor", "fused_backward": True, "max_grad_norm": 0.0, "weights_dtype": "bf16",
        "mixed_precision": "bf16"},
}
GOALS_GB = {"sd15": 8.0, "sdxl": 12.0}
BF16 = "bf16 weights (stochastic rounding) + Adafactor + fused backward"
FUSED = "Adafactor + fused backward"


def _rss() -> int:
    """The resident memory now, after handing freed heap memory back to the system (glibc keeps freed blocks
    below its mmap threshold, which would count the first step's activations as held for good)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(args, overrides: dict) -> dict:
    from dreambooth_ext.config import from_dict
    from dreambooth_ext.hosts.files import FolderHost
    from dreambooth_ext.train import run as engine

    figures: dict = {}
    loops = []
    original_init = engine._Loop.__init__

    def keep(self, *a, **k):  # the loop object, to read its optimizer and weights
        original_init(self, *a, **k)
        loops.append(self)

    engine._Loop.__init__ = keep  # put back at the end: a caller in this process (the tests) trains again after

    def on_progress(progress) -> None:
        if progress.phase != "training":
            return
        loop = loops[-1]
        if progress.step == 1:
            trained = [p for m in loop.trained.values() for p in m.parameters() if p.requires_grad]
            figures.update(_weight_figures(trained, loop.stepper))
            figures["start"] = _rss()
            _reset_peak()
        elif progress.step == args.steps:  # the resident peak of the steps so far, then one step's tensors
            figures["transient"] = _peak_mib() * 1024 ** 2 - figures["start"]
            figures["in_flight"] = tensors_in_flight(loop.bundle.unet, _optimizers(loop.stepper),
                                                     lambda: loop._optimizer_step(args.steps, train_text=False))

    data = {"project_name": "mem", "base_model": args.base, "resolution": args.resolution,
            "max_train_steps": args.steps, "prior_preservation": True, "seed": 0, "sample_every_n_steps": 0,
            "save_every_n_steps": 0, "gradient_checkpointing": "on",
            "concepts": [{"instance_dir": args.images, "class_dir": args.classes, "token": "ohwx",
                          "class_word": "toy", "num_class_images": 1, "generate_class_images": False}]}
    data.update(overrides)
    try:
        with tempfile.TemporaryDirectory() as out:
            host = FolderHost(out)
            host.publish = lambda path: None
            started = time.perf_counter()
            engine.TrainingRun(from_dict(data), host, on_progress=on_progress).run()
            figures["seconds"] = time.perf_counter() - started
    finally:
        engine._Loop.__init__ = original_init
    return figures


SDXL_SETUPS = {"Adafactor + fused backward": "lean", "LoRA rank 16": "lora"}


def run_sdxl(args, name: str) -> dict:
    """One SDXL setup, fp32, on the UNet alone (bench/gpu.py's step); the same figures as run_one, and the tensors
    alive at the step's peak."""
    import gpu

    run = gpu.Run("sdxl", SDXL_SETUPS[name], torch.device("cpu"), tiny=False, fp32=True,
                  latent=args.resolution // 8)
    batch = run.batch(2)  # batch 1 + 1 class image
    run.step(batch)
    trained = [p for p in run.unet.parameters() if p.requires_grad]
    figures = {**_weight_figures(trained, run.stepper),
               "frozen": sum(p.numel() * p.element_size() for p in run.unet.parameters() if not p.requires_grad),
               "start": _rss()}
    _reset_peak()
    started = time.perf_counter()
    for _ in range(args.steps):
        run.step(batch)
    figures["transient"] = _peak_mib() * 1024 ** 2 - figures["start"]
    figures["seconds"] = time.perf_counter() - started
    figures["in_flight"] = tensors_in_flight(run.unet, _optimizers(run.stepper), lambda: run.step(batch))
    return figures


def tensors_in_flight(module: torch.nn.Module, optimizers: list, step) -> int:
    """Bytes of the tensors alive at the peak of `step()` (one training step of `module`) besides the weights and
    the optimizers' state (activations, gradients, temporaries), counted tensor by tensor with torch's MemTracker:
    what a GPU's allocator must hold, without the CPU allocator's and oneDNN's own memory that the resident-memory
    figure also counts."""
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # Its gradient hooks cannot go on frozen weights; gradients are then counted as in flight.
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

        def _update_peak_stats(self, peak_state) -> None:
            # The whole step's peak only: torch's also updates every active module's own peak after each
            # operation, which walks all modules every time (minutes on a model with many).
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = deepcopy(snapshot)

    tracker = Tracker()
    tracker.track_external(module, *optimizers)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    held = sum(peak.get(kind, 0) for kind in (_MemRefType.PARAM, _MemRefType.BUFFER, _MemRefType.OPT))
    return peak["Total"] - held


def sdxl_report(rows: dict[str, dict], resolution: int) -> None:
    scale = (1024 / resolution) ** 2
    lean, lora = rows["Adafactor + fused backward"], rows["LoRA rank 16"]
    table = {
        "Adafactor + fused backward, fp32 weights": lean,
        "bf16 weights (stochastic rounding) + Adafactor + fused backward (computed)": {
            **lean, "weights": lean["weights_count"] * 2, "largest_weight": lean["largest_weight"] / 2},
        "LoRA rank 16, fp32 base": lora,
        "LoRA rank 16, bf16 base (computed)": {**lora, "frozen": lora["frozen"] / 2},
    }
    goals = {"bf16 weights (stochastic rounding) + Adafactor + fused backward (computed)": 12.0,
             "LoRA rank 16, bf16 base (computed)": 8.0}
    print(f"SDXL UNet, measured at {resolution} px (batch 1 + 1 class image, gradient checkpointing, fp32 on the "
          f"CPU), scaled x{scale:g} to 1024 px; GB.")
    print("  resident: the process's resident-memory peak (CPU allocator and oneDNN memory included: an upper "
          "bound); tensors: the tensors alive at the step's peak (torch's MemTracker), what a GPU's allocator must "
          "hold. Each with activations in fp32 and, after the slash, at half (what bf16 autocast keeps).")
    print(f"{'options':75} {'weights':>8} {'frozen':>7} {'optim':>6} {'resident':>13} {'tensors':>13}  goal "
          "(on tensors, bf16 activations)")
    for name, figures in table.items():
        estimates = _estimates(figures, scale)
        goal = goals.get(name)
        verdict = f"<= {goal}: {'met' if estimates[3] <= goal else 'NOT met'}" if goal else ""
        print(f"{name:75} {figures['weights'] / GB:8.2f} {figures.get('frozen', 0) / GB:7.2f} "
              f"{figures['optimizer'] / GB:6.2f} {estimates[0]:6.1f} /{estimates[1]:5.1f} "
              f"{estimates[2]:6.1f} /{estimates[3]:5.1f}  {verdict}")


def _weight_figures(trained: list[torch.Tensor], stepper) -> dict:
    """What the trained weights, their gradients and the optimizer's state take."""
    return {"weights": sum(p.numel() * p.element_size() for p in trained),
            "weights_count": sum(p.numel() for p in trained),
            "largest_weight": max(p.numel() * p.element_size() for p in trained),
            "fused": len(_optimizers(stepper)) > 1,  # the fused backward: one optimizer per weight
            "optimizer": _optimizer_bytes(stepper)}


def _estimates(figures: dict, scale: float = 1.0) -> list[float]:
    """Expected GPU peaks, GB: from the resident peak, and from the tensors, each with activations in fp32 and
    at half (bf16). Activations grow with the picture's area (`scale`), gradients do not."""
    fixed = figures["weights"] + figures.get("frozen", 0) + figures["optimizer"] + CUDA_CONTEXT
    resident = max(0.0, figures["transient"]) * scale
    grads = figures["largest_weight"] if figures["fused"] else figures["weights"]
    activations = max(0.0, figures["in_flight"] - grads) * scale
    return [(fixed + resident) / GB, (fixed + resident / 2) / GB, (fixed + grads + activations) / GB,
            (fixed + grads + activations / 2) / GB]


def _optimizers(stepper) -> list:
    """The run's optimizers: one, or one per weight with the fused backward."""
    return getattr(stepper, "_per_param", None) or [stepper.optimizer]


def _optimizer_bytes(stepper) -> int:
    total = 0
    for optimizer in _optimizers(stepper):
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def prepare(folder: Path, args) -> dict[str, str]:
    from models import save_sd15
    from PIL import Image

    base = save_sd15(folder / "sd15.safetensors", shrink=1, dtype=torch.float16)
    paths = {"base": str(base)}
    for name, color in (("images", (200, 40, 40)), ("classes", (40, 120, 200))):
        (folder / name).mkdir()
        Image.new("RGB", (args.resolution, args.resolution), color).save(folder / name / "a.png")
        paths[name] = str(folder / name)
    return paths


def measure(name: str, args, *extra: str) -> dict:
    """The figures of one combination, measured in a process of its own (its peak memory is its own)."""
    command = [sys.executable, __file__, "--run", name, "--resolution", str(args.resolution), "--steps",
               str(args.steps), *extra]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    print(f"  {name}: {figures}", file=sys.stderr)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--measure-bf16", action="store_true", help="also run the bf16 combination (slow without "
                        "AVX-512 BF16)")
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    for name in ("--base", "--images", "--classes"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        figures = run_sdxl(args, args.run) if args.model == "sdxl" else run_one(args, COMBINATIONS[args.run])
        print(json.dumps(figures))
        return
    if args.model == "sdxl":
        rows = {}
        for name in SDXL_SETUPS:
            rows[name] = measure(name, args, "--model", "sdxl")
        sdxl_report(rows, args.resolution)
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(Path(tmp), args)
        for name in COMBINATIONS:
            if name == BF16 and not args.measure_bf16:
                continue
            rows[name] = measure(name, args, "--base", paths["base"], "--images", paths["images"],
                                 "--classes", paths["classes"])
    adam = rows["fp32 AdamW"]
    if BF16 not in rows:
        fused = rows[FUSED]
        rows[BF16 + " (computed)"] = {**fused, "weights": fused["weights_count"] * 2,
                                      "largest_weight": fused["largest_weight"] / 2}
    rows = {"fp32 AdamW": adam, "8-bit AdamW (computed)": {**adam, "optimizer": adam["weights_count"] * 2},
            **{k: v for k, v in rows.items() if k != "fp32 AdamW"}}
    print(f"SD1.5 full fine-tune, {args.resolution} px, batch 1 + 1 class image, gradient checkpointing, "
          f"{args.steps} steps on the CPU; GB.")
    print("  resident: from the process's resident-memory peak (CPU allocator and oneDNN memory included: an upper "
          "bound); tensors: from the tensors alive at a step's peak (torch's MemTracker), what a GPU's allocator "
          "must hold. Each with activations in fp32 and, after the slash, at half (what bf16 autocast keeps).")
    print(f"{'options':75} {'weights':>8} {'optim':>7} {'resident':>13} {'tensors':>13}  goal <= 8 (on tensors, "
          "bf16 activations)")
    for name, figures in rows.items():
        estimates = _estimates(figures)
        verdict = "met" if estimates[3] <= GOALS_GB["sd15"] else "NOT met"
        print(f"{name:75} {figures['weights'] / GB:8.2f} {figures['optimizer'] / GB:7.2f} "
              f"{estimates[0]:6.1f} /{estimates[1]:5.1f} {estimates[2]:6.1f} /{estimates[3]:5.1f}  {verdict}")
    print("Not counted: the CUDA allocator's fragmentation and cuDNN's workspaces (bench/gpu.py measures a GPU).")

if __name__ == "__main__":
    main()
