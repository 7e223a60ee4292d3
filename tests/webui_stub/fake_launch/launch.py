"""Stand-in for the WebUI's launch.py as an extension's install.py sees it (modules/launch_utils.py, v1.10.1):
is_installed() and run_pip(), which runs `"<python>" -m pip ... --prefer-binary` in a shell and raises
RuntimeError on failure. Each run_pip call is also appended to $FAKE_LAUNCH_LOG so tests can count them."""

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

python = sys.executable
index_url = os.environ.get("INDEX_URL", "")
args = argparse.Namespace(skip_install=False)


def run(command, desc=None, errdesc=None, custom_env=None, live=False):
    if desc is not None:
        print(desc)
    result = subprocess.run(command, shell=True, env=os.environ if custom_env is None else custom_env,
                            encoding="utf8", errors="ignore", stdout=None if live else subprocess.PIPE,
                            stderr=None if live else subprocess.PIPE)
    if result.returncode != 0:
        error_bits = [f"{errdesc or 'Error running command'}.", f"Command: {command}",
                      f"Error code: {result.returncode}"]
        if result.stdout:
            error_bits.append(f"stdout: {result.stdout}")
        if result.stderr:
            error_bits.append(f"stderr: {result.stderr}")
        raise RuntimeError("\n".join(error_bits))
    return result.stdout or ""


def is_installed(package):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command, desc=None, live=False):
    if args.skip_install:
        return None
    log = os.environ.get("FAKE_LAUNCH_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(command + "\n")
    index_url_line = f" --index-url {index_url}" if index_url != "" else ""
    return run(f'"{python}" -m pip {command} --prefer-binary{index_url_line}', desc=f"Installing {desc}",
               errdesc=f"Couldn't install {desc}", live=live)
