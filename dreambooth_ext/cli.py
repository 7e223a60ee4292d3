"""Command line: `train` (our JSON config, JoePenna's flags or config file) and `demo`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import (
    CONCEPT_OPTIONS,
    OPTIONS,
    ConfigError,
    Option,
    device_for_gpu,
    from_dict,
    is_switch,
    load_json,
    regularization_folder,
    to_dict,
    validate,
)
from .errors import DreamboothError
from .inputs import check_inputs

if TYPE_CHECKING:  # torch comes in only once the input has been checked: a typo is reported at once
    from .train.launch import ChildRun
    from .train.run import Progress, RunResult, TrainingRun

log = logging.getLogger(__name__)

# How the user started us, for --help and messages: standalone.py sets it; `python -m` is the default.
PROG = os.environ.get("DREAMBOOTH_PROG", "python -m dreambooth_ext")
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

# JoePenna's main.py flags that are named differently here: his name -> (where, our name).
JOEPENNA_ALIASES = {
    "training_model": ("config", "base_model"),
    "max_training_steps": ("config", "max_train_steps"),
    "save_every_x_steps": ("config", "save_every_n_steps"),
    "training_images": ("concept", "instance_dir"),
    "regularization_images": ("concept", "class_dir"),
}


def _add_option(parser: argparse.ArgumentParser, option: Option, help_text: str) -> None:
    if option.kind == "bool" or is_switch(option):  # a bare flag turns it on
        parser.add_argument(f"--{option.name}", nargs="?", const="true", default=argparse.SUPPRESS,
                            metavar="BOOL" if option.kind == "bool" else "auto|on|off", help=help_text)
    else:
        parser.add_argument(f"--{option.name}", default=argparse.SUPPRESS, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Dreambooth training for Stable Diffusion 1.x, 2.x and SDXL checkpoints.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train per a config file and/or flags",
                                description="Train. Flags override the config file; every option of the "
                                            "schema is a flag, and JoePenna's flags work too.")
    train.add_argument("--config", "--config_file_path", dest="config_file", metavar="FILE.json",
                       help="project JSON, JoePenna's config JSON or a concepts_list.json")
    _add_common(train)
    train.add_argument("--resume", action="store_true", help="continue the project's interrupted run")
    train.add_argument("--checkpoint-dir", type=Path, default=None,
                       help="where checkpoints go (default DIR/Stable-diffusion of --models-dir)")
    train.add_argument("--lora-dir", type=Path, default=None, help="where LoRAs go (default DIR/Lora of --models-dir)")
    train.add_argument("--stop-file", type=Path, default=None,
                       help="stop after the current step, keeping the state for --resume, when this file appears")
    train.add_argument("--progress-json", action="store_true",
                       help="report progress as JSON lines on stdout (for a program that runs this command)")
    for option in OPTIONS:
        _add_option(train, option, option.help)
    for option in CONCEPT_OPTIONS:
        _add_option(train, option, f"(first concept) {option.help}")
    for alias, (_, target) in JOEPENNA_ALIASES.items():
        train.add_argument(f"--{alias}", default=argparse.SUPPRESS, help=f"same as --{target} (JoePenna)")
    train.add_argument("--gpu", type=int, default=argparse.SUPPRESS, help="same as --device cuda:N (JoePenna)")

    demo = commands.add_parser("demo", help="train a small built-in model on demo images (no downloads)",
                               description="End-to-end demo with prior preservation. Without --model it builds "
                                           "a small SD1-architecture model and trains on CPU in a few minutes.")
    _add_common(demo)
    demo.add_argument("--model", help="your own SD1/SD2 checkpoint instead of the built-in small model")
    demo.add_argument("--images", help="a folder of your own training images instead of the demo images")
    demo.add_argument("--steps", type=int, help="training steps (default: 150 small model, 400 your model)")

    ui = commands.add_parser("ui", help="serve the Dreambooth tab and its HTTP API in a browser page",
                             description="The WebUI's Dreambooth tab without the WebUI, over the checkpoints "
                                         "in DIR/Stable-diffusion. Stop with Ctrl+C.")
    _add_common(ui)
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=7861, help="port (default 7861)")
    ui.add_argument("--api-auth", default=None, help="user:password[,user2:password2] for the page and its HTTP API")
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", default="models", type=Path,
                        help="results go to DIR/Stable-diffusion/<project>/ (default ./models)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="training state, class images and samples (default DIR/dreambooth)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def config_from_args(args: argparse.Namespace) -> object:
    """The config file (if any) with every given flag applied on top, checked as one."""
    given = vars(args)
    data = to_dict(load_json(args.config_file)) if args.config_file else {"concepts": [{}]}
    if not data.get("concepts"):
        data["concepts"] = [{}]
    concept = data["concepts"][0]
    for option in OPTIONS:
        if option.name in given:
            data[option.name] = given[option.name]
    for option in CONCEPT_OPTIONS:
        if option.name in given:
            concept[option.name] = given[option.name]
    for alias, (where, target) in JOEPENNA_ALIASES.items():
        if alias in given:
            (data if where == "config" else concept)[target] = given[alias]
    _apply_joepenna_rules(given, data, concept, from_file=bool(args.config_file))
    return from_dict(data)


def _apply_joepenna_rules(given: dict, data: dict, concept: dict, *, from_file: bool) -> None:
    """His flags mean what they mean in his tool: "<token> <class>" captions, the regularization folder used as
    it is (all its images, nothing rendered into it), --gpu 0 = the default GPU."""
    if any(alias in given for alias in JOEPENNA_ALIASES) and not from_file:
        concept.setdefault("instance_prompt", "{token} {class}")
        concept.setdefault("class_prompt", "{class}")
    if "regularization_images" in given:
        data.setdefault("prior_preservation", True)
        folder = regularization_folder(given["regularization_images"])
        for key, value in folder.items():
            if key not in given:
                concept[key] = value
        if str(concept.get("token_only", "")).lower() in ("true", "1", "yes"):
            log.warning("--token_only trains without class images: the regularization images in %s are not used.",
                        given["regularization_images"])
    if "gpu" in given:
        data["device"] = device_for_gpu(given["gpu"])


class ConsoleProgress:
    """A console progress bar (a terminal's live line, or about ten lines in a log) for the training steps and the
    class images; a line for each other phase."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_phase = None
        self.bar_open = False  # a terminal's live line is being drawn

    def __call__(self, p: Progress) -> None:
        if p.phase == "training":
            self._bar(p, p.step, p.total_steps, f"step {p.step}/{p.total_steps} loss {p.loss:.4f} lr {p.lr:.2e}",
                      "it/s")
            return
        if p.phase == "class_images" and p.done:
            self._bar(p, p.done, p.total, f"class image {p.done}/{p.total}", "images/s")
            return
        if self.bar_open:
            self.stream.write("\n")
            self.bar_open = False
        if p.message and (p.phase != self.last_phase or p.phase in ("saving", "monitoring", "finished", "cancelled")):
            self.stream.write(f"[{p.phase}] {p.message}\n")
        self.stream.flush()
        self.last_phase = p.phase

    def _bar(self, p: Progress, done: int, total: int, what: str, unit: str) -> None:
        if self.bar_open and p.phase != self.last_phase:
            self.stream.write("\n")
        self.last_phase = p.phase
        if not self.interactive and done not in (1, total) and done % max(1, total // 10):
            return  # a log file gets about ten lines, a terminal a live bar
        from .train.run import clock  # loaded by the run that reports

        width = 30
        filled = int(width * done / max(1, total))
        eta = clock(p.eta_s) if p.eta_s is not None else "--:--"
        rate = f"{p.it_per_s:.2f} {unit}" if p.it_per_s else f"-- {unit}"
        start, end = ("\r", "   ") if self.interactive else ("", "\n")
        self.stream.write(f"{start}[{'#' * filled}{'.' * (width - filled)}] {what} {rate} ETA {eta}{end}")
        self.stream.flush()
        self.bar_open = self.interactive


def json_progress(p: Progress) -> None:
    print(p.to_line(), flush=True)


def folder_host(args: argparse.Namespace):
    """The host a command-line run saves through: the models folder, and the folders its flags name."""
    from .hosts.files import FolderHost

    return FolderHost(args.models_dir, args.work_dir, checkpoint_dir=getattr(args, "checkpoint_dir", None),
                      lora_dir=getattr(args, "lora_dir", None), stop_file=getattr(args, "stop_file", None))


def run_training(config, args: argparse.Namespace, *, resume: bool = False) -> RunResult:
    validate(config)
    check_inputs(config)
    from .train.launch import training_run
    from .train.parallel import join_processes

    processes = join_processes(config.device)  # `accelerate launch` started several of us: which one is this
    if not processes.is_main:
        logging.getLogger("dreambooth_ext").setLevel(logging.WARNING)  # the main process speaks for all
    host = folder_host(args)
    report = json_progress if getattr(args, "progress_json", False) else ConsoleProgress()
    run = training_run(config, host, resume=resume, on_progress=report, processes=processes)
    try:
        with stop_on_signals(run):
            return run.run()
    except KeyboardInterrupt:
        # A second Ctrl+C: stopped at once, without saving the steps since the last save point.
        raise DreamboothError("Interrupted. Saved models and the last saved training state are kept; run again "
                              "with --resume to continue from the last save point.") from None
    finally:
        processes.leave()


@contextlib.contextmanager
def stop_on_signals(run: TrainingRun | ChildRun):
    """Ctrl+C or SIGTERM (a closed terminal, a job scheduler) stops the run after the current step, which saves
    its state for --resume; a second Ctrl+C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {number: signal.getsignal(number) for number in wanted}

    def handle(number, frame):
        if run.cancelled:
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(number).name}: stopping after this step and saving the training state "
              "(Ctrl+C again stops at once).", file=sys.stderr, flush=True)
        run.cancel()

    for number in wanted:
        signal.signal(number, handle)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (wrappers and tests replace it; a handler holding
    the old one would write to a closed stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(debug: bool) -> None:
    # Only our own logger: the command line is its own process, but the engine never touches the root logger.
    logger = logging.getLogger("dreambooth_ext")
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def serve_ui(args: argparse.Namespace) -> int:
    from .ui.standalone import serve

    try:
        app = serve(args.models_dir, args.work_dir, host=args.host, port=args.port, api_auth=args.api_auth)
    except OSError as exc:
        raise DreamboothError(f"cannot serve on {args.host}:{args.port} ({exc}); pick another --port, or stop "
                              "what is using it") from exc
    print(f"Dreambooth at {app.url} (Ctrl+C stops it)", flush=True)
    # Not gradio's block_thread(): on Ctrl+C it closes its server itself, waiting for ever on connections an open
    # browser tab keeps; app.close() stops within seconds whatever the browser does. Ctrl+C and SIGTERM are
    # handled here explicitly: a process started in the background inherits SIGINT as ignored, and Python then
    # never raises KeyboardInterrupt.
    stop = threading.Event()
    wanted = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in wanted}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        print("Stopping...", flush=True)
        app.close()
    _end_lingering_threads()
    return 0


def _end_lingering_threads(grace: float = 5.0) -> None:
    """The server's own threads (gradio's queue, a connection uvicorn could not drop) may outlive its close; the
    interpreter would wait for them at exit for ever. Give them a few seconds, then end the process."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    lingering = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
                 and t.is_alive()]
    if lingering:
        log.warning("Ending with threads that did not stop (%s).", ", ".join(lingering))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def join_negative_values(argv: list[str]) -> list[str]:
    """`--learning_rate -1e-5` as `--learning_rate=-1e-5`: argparse would take the number for a flag and print
    its whole usage; joined, the schema says what the allowed range is."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if NEGATIVE_NUMBER.match(token) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    _setup_logging(args.debug)
    try:
        if args.command == "train":
            result = run_training(config_from_args(args), args, resume=args.resume)
        elif args.command == "ui":
            return serve_ui(args)
        else:
            from .demo import run_demo

            result = run_demo(args)
    except (DreamboothError, ConfigError) as exc:
        if args.debug:
            raise
        print(f"\nError: {exc}", file=sys.stderr)
        return 2
    if result.status == "cancelled":
        if args.command == "demo":
            print(f"The demo stopped at step {result.step}; run it again to start it over.", file=sys.stderr)
        elif result.step:
            print(f"Stopped at step {result.step}; the training state is saved: continue with --resume.",
                  file=sys.stderr)
        else:
            print("Stopped before the first training step; nothing to resume (class images made so far are "
                  "kept): run again without --resume.", file=sys.stderr)
        return 3
    for path in result.checkpoints:
        print(f"Saved {path}")
    for path in result.loras:
        print(f"Saved {path} (LoRA: add <lora:{path.stem}:1> to a prompt)")
    return 0
