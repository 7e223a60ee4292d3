"""The command line: JoePenna's flags, our config file, errors as one paragraph, the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_ext import cli
from dreambooth_ext.models.checkpoint import read_checkpoint
from dreambooth_ext.models.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(2):
        Image.new("RGB", (64, 64), (100 + 50 * i, 20, 60)).save(folder / f"p{i}@a photo of S as a C.png")
    return folder


def test_joepenna_flags_map_onto_the_schema(base, photos):
    args = cli.build_parser().parse_args([
        "train", "--project_name", "anna", "--training_model", str(base), "--training_images", str(photos),
        "--regularization_images", "reg", "--class_word", "woman", "--token", "zwx", "--token_only",
        "--max_training_steps", "30", "--save_every_x_steps", "10", "--flip_p", "0.5", "--learning_rate", "1e-6",
        "--seed", "7", "--resolution", "768", "--gpu", "1"])
    config = cli.config_from_args(args)
    assert (config.project_name, config.base_model, config.max_train_steps, config.save_every_n_steps) == (
        "anna", str(base), 30, 10)
    assert (config.flip_p, config.learning_rate, config.seed, config.resolution) == (0.5, 1e-6, 7, 768)
    assert config.device == "cuda:1"
    concept = config.concepts[0]
    assert (concept.instance_dir, concept.class_dir, concept.class_word, concept.token, concept.token_only) == (
        str(photos), "reg", "woman", "zwx", True)


def test_flags_override_the_config_file(tmp_path, base, photos):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schema_version": 1, "project_name": "file", "max_train_steps": 99,
                                "concepts": [{"instance_dir": str(photos), "token": "abc"}]}))
    args = cli.build_parser().parse_args(["train", "--config", str(path), "--max_train_steps", "5",
                                          "--train_text_encoder"])
    config = cli.config_from_args(args)
    assert config.project_name == "file" and config.max_train_steps == 5 and config.train_text_encoder
    assert config.concepts[0].token == "abc"


def test_train_writes_the_webui_layout(tmp_path, base, photos, capsys):
    code = cli.main(["train", "--project_name", "cli", "--training_model", str(base), "--training_images",
                     str(photos), "--class_word", "toy", "--token", "zwx", "--max_training_steps", "2",
                     "--resolution", "64", "--num_class_images", "1", "--class_image_steps", "2",
                     "--models-dir", str(tmp_path / "models")])
    assert code == 0
    out = tmp_path / "models" / "Stable-diffusion" / "cli" / "cli_2.safetensors"
    assert out.is_file()
    assert f"Saved {out}" in capsys.readouterr().out
    assert any(k.startswith("model.diffusion_model.") for k in read_checkpoint(out))


def test_user_errors_are_one_paragraph_without_traceback(tmp_path, base, capsys):
    code = cli.main(["train", "--training_model", str(base), "--training_images", str(tmp_path / "missing"),
                     "--learning_rate", "fast", "--resolution", "100", "--models-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "learning_rate = 'fast'" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, base):
    with pytest.raises(Exception, match="learning_rate"):
        cli.main(["train", "--debug", "--training_model", str(base), "--learning_rate", "fast"])


def test_missing_images_folder_is_named(tmp_path, base, capsys):
    missing = tmp_path / "no_such_folder"
    code = cli.main(["train", "--training_model", str(base), "--training_images", str(missing),
                     "--resolution", "64", "--models-dir", str(tmp_path)])
    assert code == 2
    assert "no_such_folder" in capsys.readouterr().err


def test_demo_needs_nothing_else(tmp_path, capsys):
    stopped = tmp_path / "models" / "dreambooth" / "demo" / "state"  # a demo stopped earlier: it starts over
    stopped.mkdir(parents=True)
    (stopped / "state.json").write_text(json.dumps({"step": 3, "total_steps": 6}), encoding="utf-8")
    earlier = tmp_path / "models" / "Stable-diffusion" / "demo"  # and the last demo's results are replaced
    earlier.mkdir(parents=True)
    for name in ("demo_6.safetensors", "demo_150.safetensors", "demo_150.yaml"):
        (earlier / name).write_bytes(b"an earlier demo's result")
    code = cli.main(["demo", "--models-dir", str(tmp_path / "models"), "--steps", "6"])
    assert code == 0
    result = tmp_path / "models" / "Stable-diffusion" / "demo" / "demo_6.safetensors"
    assert result.is_file() and sorted(p.name for p in earlier.iterdir()) == ["demo_6.safetensors"]
    out = capsys.readouterr().out
    assert "Demo finished" in out and "UNet tensors changed" in out
    assert len(list((tmp_path / "models" / "dreambooth" / "demo" / "class_images").glob("*.png"))) == 6


def test_ui_serves_the_tab_and_the_api_until_ctrl_c(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen([sys.executable, "-m", "dreambooth_ext", "ui", "--models-dir", str(tmp_path),
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=tmp_path,
                              # Started the way a background job is (SIGINT inherited as ignored): Ctrl+C must
                              # still stop it.
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("Dreambooth at "):
                break
        assert lines and lines[-1].startswith("Dreambooth at "), "".join(lines)
        url = lines[-1].split()[2]
        assert f":{port}" in url
        with urllib.request.urlopen(url, timeout=30) as page:
            assert "Dreambooth" in page.read().decode()
        with urllib.request.urlopen(url.rstrip("/") + "/dreambooth/v1/status", timeout=30) as status:
            assert json.load(status)["state"] == "idle"
        # A client in the middle of a request (a browser tab keeps such connections): shutdown must not wait on it.
        stuck = socket.create_connection(("127.0.0.1", port))
        stuck.sendall(b"POST /dreambooth/v1/start HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail("the server did not stop within 60 s of Ctrl+C; its output:\n" + server.stdout.read())
        assert code == 0
        stuck.close()
    finally:
        if server.poll() is None:
            server.kill()
        server.stdout.close()


def test_ui_on_a_busy_port_is_a_clear_error(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["ui", "--models-dir", str(tmp_path), "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "--port" in err and "Traceback" not in err


def _cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "dreambooth_ext", *args]


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_and_keeps_state_for_resume(tmp_path, base, photos, signal_name):
    """With the default settings (no periodic saves) Ctrl+C or SIGTERM loses nothing: --resume finishes."""
    import os
    import signal
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    flags = ["train", "--project_name", "sig", "--training_model", str(base), "--training_images", str(photos),
             "--prior_preservation", "false", "--max_training_steps", "400", "--resolution", "64",
             "--device", "cpu", "--models-dir", str(tmp_path / "models")]
    proc = subprocess.Popen(_cli(*flags), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        for line in proc.stderr:
            if " step " in line and "/400" in line:  # training has begun
                break
        proc.send_signal(getattr(signal, signal_name))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert "the training state is saved: continue with --resume" in err and "Traceback" not in err
    state = tmp_path / "models" / "dreambooth" / "sig" / "state"
    step = json.loads((state / "state.json").read_text())["step"]
    assert 1 <= step < 400

    done = subprocess.run(_cli(*flags, "--max_training_steps", "4" if step < 4 else str(step + 1), "--resume"),
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "sig_" in done.stdout and not state.exists()


def test_input_errors_come_before_torch_is_imported(tmp_path, photos):
    """A typo costs a fraction of a second: the config and paths are checked before anything heavy loads."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = ("import sys\nfrom dreambooth_ext import cli\n"
              "code = cli.main(sys.argv[1:])\nprint('torch imported' if 'torch' in sys.modules else 'no torch')\n"
              "sys.exit(code)")
    cases = [
        (["--learning_rate", "-1e-5"], "learning_rate = '-1e-5': must be between 0 and 1"),
        (["--learning_rate", "0"], "learning_rate = 0: nothing would be learnt"),
        (["--training_images", str(tmp_path / "missing")], "instance_dir"),
        (["--training_model", str(tmp_path / "missing.safetensors")], "does not exist"),
    ]
    for flags, message in cases:
        args = ["train", "--project_name", "p", "--training_model", str(tmp_path / "m.safetensors"),
                "--training_images", str(photos), *flags]
        if "--training_model" not in flags:
            (tmp_path / "m.safetensors").write_bytes(b"x")
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=root,
                              timeout=120)
        assert done.returncode == 2, (flags, done.stderr)
        assert message in done.stderr and "usage:" not in done.stderr, (flags, done.stderr)
        assert done.stdout.strip() == "no torch", flags


def test_help_names_the_command_the_user_typed(monkeypatch):
    import importlib

    monkeypatch.setenv("DREAMBOOTH_PROG", "python3 standalone.py")
    module = importlib.reload(cli)
    try:
        assert module.build_parser().format_usage().startswith("usage: python3 standalone.py ")
    finally:
        monkeypatch.delenv("DREAMBOOTH_PROG")
        importlib.reload(cli)


def test_relative_paths_given_to_standalone_py_mean_the_users_folder(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "cfg.json").write_text(json.dumps({"project_name": "../escape"}))
    done = subprocess.run([sys.executable, str(root / "standalone.py"), "train", "--config", "cfg.json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "project_name = '../escape'" in done.stderr  # cfg.json was read from where the user stands
    assert "usage: python3 standalone.py train" not in done.stderr


def test_joepennas_regularization_folder_is_used_as_it_is(tmp_path, base, photos):
    reg = tmp_path / "reg"
    reg.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (10, 90 + 40 * i, 30)).save(reg / f"r{i}.png")
    config_file = tmp_path / "joepenna.json"
    config_file.write_text(json.dumps({
        "project_name": "jp", "training_images_folder_path": str(photos), "regularization_images_folder_path":
        str(reg), "token": "zwx", "class_word": "toy", "max_training_steps": 1, "save_every_x_steps": 0,
        "model_path": str(base), "gpu": 0, "flip_percent": 0.0, "learning_rate": 1e-6, "seed": 1,
        "token_only": False}))
    code = cli.main(["train", "--config", str(config_file), "--resolution", "64",
                     "--models-dir", str(tmp_path / "models")])
    assert code == 0  # "gpu": 0 on a machine without a GPU: his default, so the CPU
    assert sorted(p.name for p in reg.iterdir()) == ["r0.png", "r1.png"]  # nothing rendered into his folder
    config = cli.config_from_args(cli.build_parser().parse_args(["train", "--config", str(config_file)]))
    assert config.concepts[0].num_class_images == 2 and not config.concepts[0].generate_class_images


def test_joepennas_flags_caption_like_his_json(tmp_path, photos, caplog):
    from dreambooth_ext.config import fill_prompt

    args = cli.build_parser().parse_args(["train", "--training_images", str(photos), "--token", "ohwx",
                                          "--class_word", "toy", "--regularization_images", str(tmp_path / "r"),
                                          "--token_only"])
    with caplog.at_level("WARNING", logger="dreambooth_ext"):
        concept = cli.config_from_args(args).concepts[0]
    assert fill_prompt(concept.instance_prompt, concept) == "ohwx"  # token_only: the token alone
    assert "regularization images in" in caplog.text and "not used" in caplog.text
    args = cli.build_parser().parse_args(["train", "--training_images", str(photos), "--token", "ohwx",
                                          "--class_word", "toy"])
    concept = cli.config_from_args(args).concepts[0]
    assert fill_prompt(concept.instance_prompt, concept) == "ohwx toy"


def test_pip_install_of_the_project_gives_a_working_engine(tmp_path):
    """`pip install .`: the package carries what the tokenizer needs (no open-clip-torch, no model hub) and the
    accelerate configurations its launches use."""
    import shutil
    import site
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(root / "dreambooth_ext", source / "dreambooth_ext", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    venv_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True, timeout=300)
    python = venv_dir / "bin" / "python"
    own_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(own_site, "engine_deps.pth").write_text(site.getsitepackages()[0] + "\n")  # torch & co., not this repo
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    check = ("import dreambooth_ext, sys\nfrom dreambooth_ext.models.tokenizer import load_tokenizer\n"
             "assert 'site-packages' in dreambooth_ext.__file__, dreambooth_ext.__file__\n"
             "sys.modules['open_clip'] = None  # whatever the environment has, the package's own file is used\n"
             "from dreambooth_ext.train.launch import MULTI_GPU_CONFIG, ZERO_CONFIG\n"
             "assert MULTI_GPU_CONFIG.is_file() and ZERO_CONFIG.is_file()  # the launches' configurations\n"
             "t = load_tokenizer()\nprint(len(t), t('photo of ohwx toy').input_ids)")
    run = subprocess.run([str(python), "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "c")})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("49408 [49406, 1125, 539, 47993, 5988, 49407]"), run.stdout


def test_the_engines_own_process_reuses_freed_memory_and_a_host_process_is_left_alone(tmp_path):
    """`python -m dreambooth_ext` keeps memory its steps free for the next step (on the CPU, fresh memory costs a
    page fault per 4 KiB); cli.main called inside another program's process changes nothing there."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    # Steps of a run in small: each allocates blocks of 16 to 64 MiB (160 MiB) and frees them all.
    steps = ("import resource, torch\n"
             "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "tensors = [torch.ones(2**22 * k) for k in (4, 2, 3, 1)]; del tensors\n"
             "f = faults()\n"
             "for step in range(8):\n"
             "    tensors = [torch.ones(2**22 * k) for k in (4, 2, 3, 1)]; del tensors\n"
             "print(faults() - f)\n")
    as_command = ("import runpy, sys\nsys.argv = ['dreambooth_ext', '--help']\n"
                  "try:\n    runpy.run_module('dreambooth_ext', run_name='__main__', alter_sys=True)\n"
                  "except SystemExit:\n    pass\n")
    in_a_host = "from dreambooth_ext import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
    faults = {}
    for name, script in (("command", as_command), ("host", in_a_host)):
        done = subprocess.run([sys.executable, "-c", script + steps], capture_output=True, text=True, cwd=root,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        faults[name] = int(done.stdout.strip().splitlines()[-1])
    pages = 8 * 160 * 2**20 // 4096  # what the 8 steps allocate, in 4 KiB pages
    assert faults["command"] < pages // 3, faults  # mostly served from what the previous steps freed
    assert faults["host"] >= pages * 9 // 10, faults  # glibc's own behaviour: fresh pages every time


def test_the_readmes_example_project_is_read_and_uses_what_the_demo_wrote(tmp_path, monkeypatch):
    """The README's first screen shows a whole project file that runs once `demo` has: the engine reads it, and its
    model, pictures and class images are where the demo puts them (with the default --models-dir)."""
    import re

    from dreambooth_ext.config import load_json
    from dreambooth_ext.demo import demo_config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    first_screen = readme.split("\n## Training from the command line")[0]
    blocks = re.findall(r"```json\n(.*?)```", first_screen, re.S)
    assert len(blocks) == 1, "the first screen shows one project file"
    (tmp_path / "my_project.json").write_text(blocks[0])
    assert "train --config my_project.json" in first_screen and "train --help" in first_screen
    example = load_json(tmp_path / "my_project.json")
    monkeypatch.chdir(tmp_path)  # the demo's files, as it writes them in the folder it runs in
    args = cli.build_parser().parse_args(["demo"])
    demo = demo_config(args, Path(args.models_dir) / "dreambooth" / "demo")
    assert Path(example.base_model) == Path(demo.base_model) and Path(example.base_model).is_file()
    for name in ("resolution", "learning_rate", "save_precision", "prior_preservation"):
        assert getattr(example, name) == getattr(demo, name), name
    ours, theirs = example.concepts[0], demo.concepts[0]
    assert Path(ours.instance_dir) == Path(theirs.instance_dir) and Path(ours.class_dir) == Path(theirs.class_dir)
    assert (ours.token, ours.class_word, ours.num_class_images) == (theirs.token, theirs.class_word,
                                                                    theirs.num_class_images)


def test_class_image_generation_shows_count_rate_and_eta_on_the_console():
    """A log gets a line at the first and the last image and about ten between; a terminal a live line."""
    import io

    from dreambooth_ext.cli import ConsoleProgress
    from dreambooth_ext.train.run import Progress

    log = io.StringIO()
    show = ConsoleProgress(log)
    show(Progress("class_images", total=40, message="Generating 40 class images"))
    for done in range(1, 41):
        show(Progress("class_images", done=done, total=40, it_per_s=0.5, eta_s=(40 - done) / 0.5))
    show(Progress("caching", message="Caching latents"))
    lines = log.getvalue().splitlines()
    assert lines[0] == "[class_images] Generating 40 class images"
    assert lines[1] == "[" + "." * 30 + "] class image 1/40 0.50 images/s ETA 1:18"
    assert lines[-2] == "[" + "#" * 30 + "] class image 40/40 0.50 images/s ETA 0:00"
    assert len(lines) == 2 + 10 + 1 and lines[-1] == "[caching] Caching latents"
