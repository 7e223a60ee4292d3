"""Start: from an SD1.5-shaped checkpoint file (real size, fp16, random weights) to "ready to train", against
diffusers' own single-file loading.

- engine: `load_bundle_from_file`: modules built on the meta device and given the file's tensors (the UNet in
  fp32, the frozen VAE and text encoder in the file's precision), the file's hash computed in the background (not
  waited for: a run needs it only when it saves).
- diffusers single-file: `StableDiffusionPipeline.from_single_file` (UNet, VAE, text encoder, tokenizer,
  scheduler), as a diffusers user loads a WebUI checkpoint.
- diffusers single-file + save + reload: the same, then `save_pretrained` and each part's `from_pretrained`, as
  diffusers' trainers (`train_dreambooth.py`) need: they read a diffusers folder, not a single file.
No path downloads anything (the children run with HF_HUB_OFFLINE=1): from_single_file is given a local folder of
diffusers configs (`config=`), written from the checkpoint's own shapes, with the CLIP tokenizer built offline.

Each path runs in its own process (its peak memory is its own), interleaved, repeated; the best of each is shown,
and the range of the engine's ratio over the interleaved rounds. "load" starts after the path's imports (torch,
diffusers, transformers and the classes it uses; the pipeline classes only for the diffusers paths); "from process
start" counts everything from the process's start (the interpreter, the imports and the loading).

    python bench/start.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import _peak_mib  # noqa: E402

GOAL = 0.1  # engine / (single-file + save + reload), the path a diffusers trainer needs
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ----------------------------------------------------------------------------------------------------------
# The diffusers configs from_single_file reads instead of the hub


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2), encoding="utf-8")


def write_diffusers_configs(checkpoint: Path, folder: Path) -> Path:
    """A diffusers pipeline folder without weights (model_index.json, each part's config, the tokenizer), derived
    from the checkpoint's own shapes by the engine's converters: what `from_single_file(config=folder)` needs."""
    from dreambooth_ext.models import convert
    from dreambooth_ext.models.bundle import make_noise_scheduler
    from dreambooth_ext.models.checkpoint import read_checkpoint
    from dreambooth_ext.models.family import SD1_TEXT_PREFIX, family_named
    from dreambooth_ext.models.tokenizer import load_tokenizer

    sd = read_checkpoint(checkpoint)
    family = family_named("sd1")
    _write_json(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                                  **convert.unet_config_from_ldm(sd, family)})
    _write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL",
                                                 **convert.vae_config_from_ldm(sd, family)})
    convert.clip_config_from_ldm(sd, SD1_TEXT_PREFIX, "quick_gelu").save_pretrained(str(folder / "text_encoder"))
    load_tokenizer().save_pretrained(str(folder / "tokenizer"))
    schedule = make_noise_scheduler("epsilon")
    type(schedule).from_config(schedule.config, steps_offset=1).save_config(str(folder / "scheduler"))  # as SD1.5's
    _write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"]})
    return folder


# ----------------------------------------------------------------------------------------------------------
# The paths: (imports, load), each load taking the checkpoint and the configs folder


def engine_imports() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401 - the classes the engine builds
    from transformers import CLIPTextModel  # noqa: F401

    import dreambooth_ext.models.bundle  # noqa: F401


def engine(path: str, configs: str) -> dict:
    from dreambooth_ext.models.bundle import load_bundle_from_file

    bundle = load_bundle_from_file(path)
    return {"unet": bundle.unet, "vae": bundle.vae, "text_encoder": bundle.text_encoders[0]}


def diffusers_imports() -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def load_pipeline(path: str, configs: str):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(path, config=configs, local_files_only=True, safety_checker=None,
                                                    requires_safety_checker=False)


def single_file(path: str, configs: str) -> dict:
    pipe = load_pipeline(path, configs)
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


def single_file_saved(path: str, configs: str) -> dict:
    """from_single_file, save_pretrained, then each part loaded back as train_dreambooth.py loads it (the
    pipeline is let go first: a trainer converts once, then trains from the folder)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="bench-start-") as folder:
        pipe = load_pipeline(path, configs)
        pipe.save_pretrained(folder)
        del pipe
        gc.collect()
        CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        return {"text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet")}


PATHS: dict[str, tuple[Callable[[], None], Callable[[str, str], dict]]] = {
    "engine": (engine_imports, engine),
    "diffusers single-file": (diffusers_imports, single_file),
    "diffusers single-file + save + reload": (diffusers_imports, single_file_saved),
}


# ----------------------------------------------------------------------------------------------------------
# One run (in its own process), and the interleaved rounds


def run_one(name: str, path: str, configs: str, spawned: float) -> dict:
    """Called in the child: the path's imports, then its load; seconds from the child's own start and from its
    spawn (the parent's wall clock when it started the process)."""
    imports, load = PATHS[name]
    imports()
    start = time.perf_counter()
    load(path, configs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "from_start": time.time() - spawned, "peak_mib": _peak_mib(),
            "threads": torch.get_num_threads()}


def measure(path: Path, configs: Path, repeats: int, names: list[str] | None = None) -> dict[str, list[dict]]:
    """Each path in its own process, the paths interleaved round by round (a shared machine's load then falls on
    all of them alike)."""
    names = names or list(PATHS)
    results: dict[str, list[dict]] = {name: [] for name in names}
    env = {**os.environ, **OFFLINE}
    for _ in range(repeats):
        for name in names:
            command = [sys.executable, __file__, "--run", name, "--file", str(path), "--configs", str(configs),
                       "--spawned", repr(time.time())]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {name}: {results[name][-1]}", file=sys.stderr)
    return results


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(size_gb: float, repeats: int) -> str:
    from dreambooth_ext.train.devices import cpu_computes_bf16

    bf16 = "computes bf16 natively" if cpu_computes_bf16() else "no native bf16 (torch emulates it: fp32 is faster)"
    return (f"SD1.5-shaped checkpoint (fp16, {size_gb:.1f} GB) to ready-to-train, best of {repeats}\n"
            f"CPU: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} logical cores, {bf16}; "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads")


def report(results: dict[str, list[dict]], repeats: int) -> list[str]:
    keys = ("seconds", "from_start", "peak_mib")
    best = {name: {k: min(r[k] for r in runs) for k in keys} for name, runs in results.items()}
    lines = [f"{'path':40} {'load':>8} {'from process start':>19} {'peak':>9}"]
    for name, figures in best.items():
        lines.append(f"{name:40} {figures['seconds']:6.1f} s {figures['from_start']:17.1f} s "
                     f"{figures['peak_mib'] / 1024:5.1f} GiB")
    threads = {r["threads"] for runs in results.values() for r in runs}
    if threads != {torch.get_num_threads()}:
        lines.append(f"(the measured processes ran with {sorted(threads)} torch threads)")
    engine_runs = results["engine"]
    for name, runs in results.items():
        if name == "engine":
            continue
        ratios = [mine["seconds"] / theirs["seconds"] for mine, theirs in zip(engine_runs, runs, strict=True)]
        figures = {k: best["engine"][k] / best[name][k] for k in keys}
        goal = ""
        if name == "diffusers single-file + save + reload":
            goal = f"   goal <= {GOAL}: {'met' if figures['seconds'] <= GOAL else 'NOT met'}"
        lines.append(f"engine / {name}: load {figures['seconds']:.2f}x (rounds {min(ratios):.2f}x to "
                     f"{max(ratios):.2f}x), from process start {figures['from_start']:.2f}x, "
                     f"peak {figures['peak_mib']:.2f}x{goal}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.file, args.configs, args.spawned)))
        return
    from models import save_sd15

    with tempfile.TemporaryDirectory() as tmp:
        path = save_sd15(Path(tmp) / "sd15.safetensors", dtype=torch.float16)
        configs = write_diffusers_configs(path, Path(tmp) / "configs")
        print(header(path.stat().st_size / 1e9, args.repeats), flush=True)
        results = measure(path, configs, args.repeats)
    print("\n".join(report(results, args.repeats)))


if __name__ == "__main__":
    main()
