"""Run by the WebUI (a subprocess, at install and at every start): install what the Dreambooth engine needs and the
WebUI lacks, and never change a package the WebUI already has.

- diffusers (models and schedulers only): a version that fits the huggingface_hub/transformers found;
- bitsandbytes (8-bit AdamW, optional): only with a CUDA build of torch AND a CUDA device the NVIDIA driver reports
  (asked of the driver library, not of torch: importing torch here would cost seconds at every start), in a release
  that accepts that torch. Installed on a machine without a GPU it would only slow every WebUI start (transformers
  and diffusers import it whenever it is installed) and print a warning.
Every install runs under a constraints file pinning every installed distribution to its installed version, so pip
can add packages but cannot upgrade or downgrade torch or anything else of the host's. When everything is present
this is a no-op: no pip, no heavy imports. Nothing here may stop the WebUI from starting: failures print one line.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TAG = "[Dreambooth]"
# PEP 440 versions pip accepts in a constraint; anything else (legacy versions) is left unpinned.
_VERSION = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?$", re.I)


@dataclass
class Step:
    """One missing package: the requirement strings to try in order, and what is lost without it."""

    name: str
    candidates: list[str] = field(default_factory=list)
    feature: str = ""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """Every installed distribution, by canonical name; the first one found wins, as for imports."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and dist.version:
            found.setdefault(canonical(name), dist.version)
    return found


def release(version: str) -> tuple[int, ...]:
    """The leading numeric part: "2.1.2+cu121" -> (2, 1, 2)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def diffusers_candidates(installed: dict[str, str]) -> list[str]:
    """0.31.0 is what the engine is tested on (and what Forge ships); the range lets pip pick what fits the pins."""
    hub = installed.get("huggingface-hub")
    if hub and release(hub) >= (1,):
        return ["diffusers>=0.36"]  # hub >= 1 comes with a transformers new enough for current diffusers
    return ["diffusers==0.31.0", "diffusers>=0.27,<0.36"]  # 0.36+ needs huggingface_hub >= 1


def cuda_device_count() -> int:
    """How many CUDA devices the NVIDIA driver reports (honouring CUDA_VISIBLE_DEVICES), 0 without a driver. Asked of
    the driver library through ctypes, as torch itself does, so the installer never imports torch."""
    for name in ("nvcuda.dll",) if os.name == "nt" else ("libcuda.so.1", "libcuda.so"):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0  # a driver without a usable device (CUDA_ERROR_NO_DEVICE and the like)
        return count.value
    return 0


def bitsandbytes_requirement(installed: dict[str, str], platform: str = sys.platform,
                             cuda_devices: Callable[[], int] = cuda_device_count) -> tuple[str | None, str]:
    """(requirement, "") or (None, why not). Lower torch floors of bitsandbytes: 0.45 torch>=2.0, 0.46-0.47
    torch>=2.2, 0.48-0.49 torch>=2.3, 0.50 torch>=2.4 (from their wheels' metadata). The driver is asked last: only
    when the torch build could use a GPU."""
    torch_version = installed.get("torch")
    if not torch_version:
        return None, "torch is not installed"
    local = torch_version.partition("+")[2].lower()
    if platform == "darwin" or (local and not local.startswith("cu")):
        return None, f"it needs an NVIDIA GPU with a CUDA build of torch (this is torch {torch_version})"
    torch_release = release(torch_version)
    if torch_release < (2, 0):
        return None, f"it needs torch 2 or newer (this is torch {torch_version})"
    if cuda_devices() < 1:
        return None, "it needs an NVIDIA GPU and none was found"
    for below, cap in (((2, 2), "<0.46"), ((2, 3), "<0.48"), ((2, 4), "<0.50")):
        if torch_release < below:
            return f"bitsandbytes>=0.43,{cap}", ""
    return "bitsandbytes>=0.43", ""


def plan(installed: dict[str, str], platform: str = sys.platform,
         cuda_devices: Callable[[], int] = cuda_device_count) -> tuple[list[Step], list[str]]:
    """(what to install, one-line notes about optional features that cannot be had here)."""
    steps, notes = [], []
    if "diffusers" not in installed:
        steps.append(Step("diffusers", diffusers_candidates(installed), "Dreambooth training"))
    if "bitsandbytes" not in installed:
        requirement, why = bitsandbytes_requirement(installed, platform, cuda_devices)
        if requirement:
            steps.append(Step("bitsandbytes", [requirement], "the adamw_8bit optimizer"))
        else:
            notes.append(f"{TAG} adamw_8bit (8-bit AdamW) is not available: {why}. Use the adamw or adafactor "
                         "optimizer.")
    return steps, notes


def write_pins(installed: dict[str, str], path: Path) -> Path:
    """A pip constraints file: every installed distribution at its installed version."""
    lines = [f"{name}=={version}" for name, version in sorted(installed.items()) if _VERSION.match(version)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _launch():
    """The WebUI's launch module (its root is on PYTHONPATH when it runs installers)."""
    import launch

    return launch


def install(step: Step, launch, pins: Path) -> bool:
    """Try each candidate under the pins; True once one installs."""
    failure = ""
    for requirement in step.candidates:
        try:
            launch.run_pip(f'install -c "{pins}" "{requirement}"', f"{requirement} for the Dreambooth extension")
            return True
        except Exception as exc:  # run_pip raises RuntimeError with pip's output; try the next candidate
            failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"{TAG} could not install {step.name} without changing the WebUI's packages ({failure}); "
          f"{step.feature} is unavailable until it is installed.")
    return False


def main() -> int:
    try:
        installed = installed_versions()
        steps, notes = plan(installed, cuda_devices=cuda_device_count)  # the module's, looked up now (tests)
        for note in notes:
            print(note)
        if not steps:
            return 0
        launch = _launch()
        steps = [s for s in steps if not launch.is_installed(s.name)]
        if not steps:
            return 0
        with tempfile.TemporaryDirectory(prefix="dreambooth-install-") as tmp:
            pins = write_pins(installed, Path(tmp) / "webui-pins.txt")
            for step in steps:
                install(step, launch, pins)
    except Exception as exc:  # never let the extension's installer break the WebUI's start
        print(f"{TAG} could not check its packages ({type(exc).__name__}: {exc}); the extension may not work.")
    return 0


if __name__ == "__main__":
    main()
