"""Start: from an SD1.5-shaped checkpoint file (real size, fp16, random weights) to "ready to train", against the
convert-from-disk path of the best-known competing extension.

- engine: `load_bundle_from_file`: modules built on the meta device and given the file's tensors, the file's hash
  computed in the background (not waited for: a run needs it only when it saves).
- convert-from-disk (what `from_single_file` + `save_pretrained` + `from_pretrained` do): hash the file, build
  each module normally (random initialisation) and load the converted weights, write the diffusers folders, and
  load the modules back from them.
Each runs in its own process (its peak memory is its own), interleaved, repeated; the best of each is shown.
Both import the same packages first (torch, diffusers, transformers and the three model classes, whose first
import pulls in torch._dynamo: about 2.5 s on this machine, the same for both paths); the time is shown with and
without those imports, and the goal is judged on the loading itself.

    python bench/start.py [--repeats 2]
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

from speed import _peak_mib  # noqa: E402

GOAL = 0.1


def engine(path: str) -> None:
    from dreambooth_ext.models.bundle import load_bundle_from_file

    load_bundle_from_file(path)


def convert_from_disk(path: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from dreambooth_ext.models import convert
    from dreambooth_ext.models.checkpoint import file_sha256, read_checkpoint
    from dreambooth_ext.models.family import SD1_TEXT_PREFIX, family_named

    file_sha256(Path(path))
    sd = read_checkpoint(Path(path))
    family = family_named("sd1")
    helpers = convert._helpers()
    unet_config = convert.unet_config_from_ldm(sd, family)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(helpers.convert_ldm_unet_checkpoint(sd, unet_config))
    vae_config = convert.vae_config_from_ldm(sd, family)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(helpers.convert_ldm_vae_checkpoint(
        {k: v for k, v in sd.items() if k.startswith(convert.VAE_PREFIX)}, vae_config))
    text = CLIPTextModel(convert.clip_config_from_ldm(sd, SD1_TEXT_PREFIX, "quick_gelu"))
    text.load_state_dict({k[len(SD1_TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(SD1_TEXT_PREFIX)},
                         strict=False)
    with tempfile.TemporaryDirectory() as folder:
        for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
            module.save_pretrained(f"{folder}/{name}")
        del unet, vae, text
        UNet2DConditionModel.from_pretrained(f"{folder}/unet")
        AutoencoderKL.from_pretrained(f"{folder}/vae")
        CLIPTextModel.from_pretrained(f"{folder}/text_encoder")


PATHS = {"engine": engine, "convert-from-disk": convert_from_disk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        start = time.perf_counter()
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401 - what both paths import
        from transformers import CLIPTextModel  # noqa: F401

        import dreambooth_ext.models.bundle  # noqa: F401
        imported = time.perf_counter()
        PATHS[args.run](args.file)
        end = time.perf_counter()
        print(json.dumps({"seconds": end - imported, "with_imports": end - start, "peak_mib": _peak_mib()}))
        return
    from models import save_sd15

    results: dict[str, list[dict]] = {name: [] for name in PATHS}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_sd15(Path(tmp) / "sd15.safetensors", dtype=torch.float16)
        size_gb = path.stat().st_size / 1e9
        for _ in range(args.repeats):
            for name in PATHS:
                out = subprocess.run([sys.executable, __file__, "--run", name, "--file", str(path)], check=True,
                                     capture_output=True, text=True).stdout
                results[name].append(json.loads(out.strip().splitlines()[-1]))
                print(f"  {name}: {results[name][-1]}", file=sys.stderr)
    keys = ("seconds", "with_imports", "peak_mib")
    best = {name: {k: min(r[k] for r in runs) for k in keys} for name, runs in results.items()}
    ref = best["convert-from-disk"]
    print(f"SD1.5-shaped checkpoint (fp16, {size_gb:.1f} GB) to ready-to-train, best of {args.repeats}")
    print(f"{'path':20} {'load':>7}   {'ratio':>5}   {'with imports':>12} {'ratio':>5}   {'peak':>9} {'ratio':>5}")
    for name, figures in best.items():
        ratio = figures["seconds"] / ref["seconds"]
        verdict = f"goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}" if name == "engine" else ""
        print(f"{name:20} {figures['seconds']:7.1f} s {ratio:5.2f}x   {figures['with_imports']:10.1f} s "
              f"{figures['with_imports'] / ref['with_imports']:5.2f}x   {figures['peak_mib'] / 1024:5.1f} GiB "
              f"{figures['peak_mib'] / ref['peak_mib']:5.2f}x   {verdict}")


if __name__ == "__main__":
    main()
