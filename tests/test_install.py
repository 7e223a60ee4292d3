"""install.py: what it would install for a given host environment, and a real run against a host-pinned venv."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from venvs import cached_venv, venv_python

REPO = Path(__file__).resolve().parent.parent
INSTALL_PY = REPO / "install.py"
CONSTRAINTS = REPO / "constraints.txt"
FAKE_LAUNCH = Path(__file__).resolve().parent / "webui_stub" / "fake_launch"
# The host's pins that matter to the engine (v1.10.1 requirements_versions.txt) with this project's torch.
HOST_PACKAGES = ["torch==2.13.0", "transformers==4.30.2", "safetensors==0.4.2", "numpy==1.26.2", "Pillow==9.5.0",
                 "huggingface_hub<1", "accelerate==0.21.0"]


def load_installer():
    spec = importlib.util.spec_from_file_location("dreambooth_install", INSTALL_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


installer = load_installer()
HOST = {"torch": "2.1.2+cu121", "transformers": "4.30.2", "huggingface-hub": "0.36.2", "numpy": "1.26.2"}


# ----------------------------------------------------------------------------------------------------------
# The plan


@pytest.mark.parametrize(("torch_version", "expected"), [
    ("2.1.2+cu121", "bitsandbytes>=0.43,<0.46"),
    ("2.1.2", "bitsandbytes>=0.43,<0.46"),  # PyPI's Linux wheels are CUDA builds without a local tag
    ("2.2.2+cu121", "bitsandbytes>=0.43,<0.48"),
    ("2.3.1+cu121", "bitsandbytes>=0.43,<0.50"),
    ("2.4.0+cu124", "bitsandbytes>=0.43"),
    ("2.7.0", "bitsandbytes>=0.43"),
])
def test_bitsandbytes_release_fits_the_installed_torch(torch_version, expected):
    requirement, why = installer.bitsandbytes_requirement({"torch": torch_version}, platform="linux",
                                                          cuda_devices=lambda: 1)
    assert (requirement, why) == (expected, "")


@pytest.mark.parametrize(("torch_version", "platform", "reason"), [
    ("2.13.0+cpu", "linux", "CUDA build of torch"),
    ("2.1.2+rocm5.6", "linux", "CUDA build of torch"),
    ("2.1.2", "darwin", "NVIDIA GPU"),
    ("1.13.1+cu117", "linux", "torch 2 or newer"),
])
def test_bitsandbytes_is_skipped_where_it_cannot_work(torch_version, platform, reason):
    requirement, why = installer.bitsandbytes_requirement({"torch": torch_version}, platform=platform,
                                                          cuda_devices=lambda: 1)
    assert requirement is None and reason in why


def test_bitsandbytes_needs_a_cuda_device_not_only_a_cuda_build_of_torch():
    requirement, why = installer.bitsandbytes_requirement({"torch": "2.1.2+cu121"}, platform="linux",
                                                          cuda_devices=lambda: 0)
    assert requirement is None and why == "it needs an NVIDIA GPU and none was found"


def _machine_has_an_nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


@pytest.mark.skipif(_machine_has_an_nvidia_driver(), reason="this machine has an NVIDIA driver")
def test_a_cuda_build_of_torch_on_a_machine_without_a_gpu_gets_no_bitsandbytes():
    """The WebUI's launcher installs a CUDA build of torch on every Linux machine; bitsandbytes there would only be
    imported (by transformers and diffusers) at every WebUI start, costing seconds and printing a warning."""
    assert installer.cuda_device_count() == 0
    steps, notes = installer.plan(HOST, platform="linux")
    assert [s.name for s in steps] == ["diffusers"]
    assert notes == ["[Dreambooth] adamw_8bit (8-bit AdamW) is not available: it needs an NVIDIA GPU and none was "
                     "found. Use the adamw or adafactor optimizer."]


class _FakeDriver:
    """libcuda's two calls the installer makes, answering as a driver with `devices` GPUs (or `error`) would."""

    def __init__(self, devices: int = 0, error: int = 0):
        self.devices, self.error = devices, error

    def cuInit(self, flags):  # noqa: N802 - the driver's own name
        return self.error

    def cuDeviceGetCount(self, count):  # noqa: N802
        count._obj.value = self.devices
        return 0


@pytest.mark.parametrize(("libraries", "expected"), [
    ({}, 0),  # no NVIDIA driver at all
    ({"libcuda.so.1": _FakeDriver(error=100)}, 0),  # CUDA_ERROR_NO_DEVICE
    ({"libcuda.so.1": _FakeDriver(devices=2)}, 2),
    ({"libcuda.so": _FakeDriver(devices=1)}, 1),  # only the unversioned name on the loader's path
])
def test_cuda_devices_are_counted_by_the_driver(monkeypatch, libraries, expected):
    def load(name):
        if name not in libraries:
            raise OSError(f"{name}: cannot open shared object file")
        return libraries[name]

    monkeypatch.setattr(installer.os, "name", "posix")
    monkeypatch.setattr(installer.ctypes, "CDLL", load)
    assert installer.cuda_device_count() == expected


def test_plan_installs_only_what_is_missing():
    steps, notes = installer.plan(HOST, platform="linux", cuda_devices=lambda: 1)
    assert [(s.name, s.candidates) for s in steps] == [
        ("diffusers", ["diffusers==0.31.0", "diffusers>=0.27,<0.36"]),
        ("bitsandbytes", ["bitsandbytes>=0.43,<0.46"])]
    assert notes == []
    steps, _ = installer.plan({**HOST, "diffusers": "0.31.0", "bitsandbytes": "0.45.5"}, platform="linux",
                              cuda_devices=lambda: 1 / 0)  # installed: the driver is not even asked
    assert steps == []
    steps, notes = installer.plan({**HOST, "torch": "2.1.2+cpu", "diffusers": "0.31.0"}, platform="linux")
    assert steps == [] and len(notes) == 1 and "adamw_8bit" in notes[0]
    steps, _ = installer.plan({**HOST, "huggingface-hub": "1.1.0"}, platform="darwin")
    assert [s.candidates for s in steps] == [["diffusers>=0.36"]]


def test_pins_cover_every_installed_distribution(tmp_path):
    pins = installer.write_pins({"torch": "2.1.2+cu121", "numpy": "1.26.2", "odd": "1.0-legacy", "pip": "23.2.1"},
                                tmp_path / "pins.txt")
    assert pins.read_text().splitlines() == ["numpy==1.26.2", "pip==23.2.1", "torch==2.1.2+cu121"]


class _FailingLaunch:
    calls: list = []

    @staticmethod
    def is_installed(name):
        return False

    @classmethod
    def run_pip(cls, command, desc=None, live=False):
        cls.calls.append(command)
        raise RuntimeError(f"Couldn't install {desc}.\nCommand: pip {command}")


def test_failures_print_one_line_and_never_raise(monkeypatch, capsys):
    monkeypatch.setattr(installer, "installed_versions", lambda: dict(HOST))
    monkeypatch.setattr(installer, "_launch", lambda: _FailingLaunch)
    monkeypatch.setattr(installer.sys, "platform", "linux")
    monkeypatch.setattr(installer, "cuda_device_count", lambda: 1)
    assert installer.main() == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2  # one per package that could not be had
    assert lines[0].startswith("[Dreambooth] could not install diffusers without changing the WebUI's packages")
    assert len(_FailingLaunch.calls) == 3 and all(' -c "' in c for c in _FailingLaunch.calls)

    monkeypatch.setattr(installer, "installed_versions", lambda: 1 / 0)
    assert installer.main() == 0
    assert "could not check its packages (ZeroDivisionError" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# A real run against a venv holding the host's pins


def _pip(python: Path, *args: str, timeout: int = 900) -> str:
    env = {**os.environ, "PIP_CONSTRAINT": str(CONSTRAINTS), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, env=env,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _freeze(python: Path) -> dict[str, str]:
    lines = _pip(python, "list", "--format=freeze").splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line)


def _host_venv():
    """A venv with the host's packages, built once per constraints file and reused (CI pays once); a context
    manager holding it for the test."""

    def build(python: Path) -> None:
        _pip(python, "install", "-c", str(CONSTRAINTS), *HOST_PACKAGES)
        freeze = "\n".join(f"{k}=={v}" for k, v in sorted(_freeze(python).items()))
        (python.parent.parent / "base-freeze.txt").write_text(freeze)

    return cached_venv("webui-host", CONSTRAINTS.read_bytes() + "\n".join(HOST_PACKAGES).encode(), build)


def _reset(venv: Path) -> None:
    """Back to the venv's base set: remove whatever an earlier (possibly interrupted) run added."""
    python = venv_python(venv)
    base = dict(line.split("==", 1) for line in (venv / "base-freeze.txt").read_text().splitlines())
    extra = sorted(set(_freeze(python)) - set(base))
    if extra:
        _pip(python, "uninstall", "-y", *extra)
    assert _freeze(python) == base


def _run_installer(python: Path, tmp_path: Path, log: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(FAKE_LAUNCH), "FAKE_LAUNCH_LOG": str(log),
           "PIP_CONSTRAINT": str(CONSTRAINTS)}
    started = time.perf_counter()
    result = subprocess.run([str(python), str(INSTALL_PY)], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    return result, time.perf_counter() - started


def test_install_adds_packages_without_touching_the_hosts(tmp_path):
    with _host_venv() as venv:
        check_installer_in(venv, tmp_path)


def check_installer_in(venv: Path, tmp_path: Path) -> None:
    python = venv_python(venv)
    _reset(venv)
    log = tmp_path / "pip-calls.log"
    try:
        before = _freeze(python)
        result, _ = _run_installer(python, tmp_path, log)
        assert result.returncode == 0, result.stderr
        after = _freeze(python)

        assert {name: after.get(name) for name in before} == before  # nothing upgraded, downgraded or removed
        added = set(after) - set(before)
        assert "diffusers" in added and after["diffusers"] == "0.31.0"
        assert "bitsandbytes" not in added  # CPU torch: skipped, with one line saying so
        assert "adamw_8bit (8-bit AdamW) is not available" in result.stdout
        calls = log.read_text().splitlines()
        assert len(calls) == 1 and calls[0].startswith('install -c "') and '"diffusers==0.31.0"' in calls[0]
        check = subprocess.run([str(python), "-c", "from diffusers import UNet2DConditionModel, DDPMScheduler"],
                               capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stderr  # the chosen diffusers imports with the host's hub/transformers

        again, seconds = _run_installer(python, tmp_path, log)
        assert again.returncode == 0 and log.read_text().splitlines() == calls  # no pip call the second time
        assert seconds < 10, seconds
        assert _freeze(python) == after
    finally:
        _reset(venv)


_LOGGING_LAUNCH = '''
import importlib.metadata, os

def is_installed(package):
    try:
        return importlib.metadata.distribution(package) is not None
    except importlib.metadata.PackageNotFoundError:
        return False

def run_pip(command, desc=None, live=False):
    with open(os.environ["FAKE_LAUNCH_LOG"], "a", encoding="utf-8") as log:
        log.write(command + "\\n")
'''


@pytest.mark.skipif(_machine_has_an_nvidia_driver(), reason="this machine has an NVIDIA driver")
def test_the_installer_process_adds_no_bitsandbytes_for_a_cuda_torch_without_a_gpu(tmp_path):
    """As the WebUI runs it at every start, on a machine without a GPU whose torch is the CUDA build the WebUI's
    launcher installs (a distribution record says torch 2.1.2+cu121): no pip call, one line saying why, and torch is
    never imported (that alone would cost seconds at every start). pip is never run: the launch stand-in logs."""
    (tmp_path / "launch.py").write_text(_LOGGING_LAUNCH, encoding="utf-8")
    record = tmp_path / "torch-2.1.2+cu121.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.1.2+cu121\n", encoding="utf-8")
    log = tmp_path / "pip-calls.log"
    log.touch()
    probe = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__'); "
             "print('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, str(INSTALL_PY)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path), "FAKE_LAUNCH_LOG": str(log)},
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert log.read_text() == ""
    assert result.stdout.splitlines() == [
        "[Dreambooth] adamw_8bit (8-bit AdamW) is not available: it needs an NVIDIA GPU and none was found. Use the "
        "adamw or adafactor optimizer.", "torch imported: False"]
