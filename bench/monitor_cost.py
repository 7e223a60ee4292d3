"""The learning monitor's cost: the same run with the monitor off (monitor_every_n_steps -1) and at its defaults,
side by side, each in its own process (so peak memory is its own), interleaved and repeated.

Each run reports its total time (on a CPU the process's CPU time, which other work on a shared machine distorts far
less than the wall clock), its median step time (the monitor's points left out), its peak resident memory (and the
GPU's peak allocation on a GPU) and, with the monitor on, the time of each monitor point: the base's (its pictures
and text encoded too), the points with a render (memorization: at saves and the end) and those without. A short run
has a point every few steps (the default schedule puts 10 in any run), so its own share says little; the share of a
default-length run is computed from those times: the points of the default schedule (train/monitor.py's is_point)
at their measured costs, over that many steps at the measured step time plus those points.

    python bench/monitor_cost.py [--shrink 4] [--resolution 256] [--steps 20] [--repeats 2] [--device cpu]
    python bench/monitor_cost.py --device cuda --shrink 1 --resolution 512 --steps 40   # SD1.5's real size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import _peak_mib, add_run_options, prepare, run_apart  # noqa: E402

GOAL = 0.05  # the monitor's share of a default run's time, at most
WARMUP = 2
# The runs whose share is computed: (name, max_train_steps, save_every_n_steps, stop_when_memorizing)
SCHEDULES = (("default run: 1000 steps, saved at the end", 1000, 0, False),
             ("1000 steps, saved every 250", 1000, 250, False),
             ("1000 steps, stop_when_memorizing", 1000, 0, True))


def run_one(args, monitored: bool) -> dict:
    """One run of the engine with the monitor at its defaults (or off): its figures."""
    from dreambooth_ext.config import from_dict
    from dreambooth_ext.hosts.files import FolderHost
    from dreambooth_ext.train.run import TrainingRun

    data = {"project_name": "bench", "base_model": args.base, "resolution": args.resolution,
            "max_train_steps": args.steps, "prior_preservation": True, "seed": 0, "sample_every_n_steps": 0,
            "save_precision": "fp16", "device": args.device, "monitor_every_n_steps": 0 if monitored else -1,
            "concepts": [{"instance_dir": args.images, "class_dir": args.classes, "token": "ohwx",
                          "class_word": "toy", "num_class_images": len(os.listdir(args.classes)),
                          "generate_class_images": False}]}
    stamps: list[float] = []  # when each step was reported, on a clock that stops during the monitor's points
    points: list[dict] = []
    last = {"time": 0.0, "paused": 0.0}
    clock = _clock(args.device)

    def on_progress(progress) -> None:
        now = clock()
        if progress.phase == "training":
            stamps.append(now - last["paused"])
        elif progress.phase == "monitoring" and progress.message.startswith("Monitor at step"):
            point = progress.monitor["points"][-1]
            points.append({"step": point["step"], "seconds": now - last["time"],
                           "render": point["memorization"] is not None})
            last["paused"] += now - last["time"]
        last["time"] = now

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = clock()
    with tempfile.TemporaryDirectory() as out:
        TrainingRun(from_dict(data), FolderHost(out), on_progress=on_progress).run()
    total = clock() - started
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][WARMUP - 1:]
    gpu_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"total_s": total, "step_s": statistics.median(steps), "peak_mib": _peak_mib(), "gpu_gib": gpu_gib,
            "points": points}


def _clock(device: str):
    """On a CPU the process's CPU time (all its threads): a machine shared with other work slows a run unevenly,
    but not the work it does. On a GPU the wall clock (the GPU's time is not the process's)."""
    return time.process_time if torch.device(device).type == "cpu" else time.perf_counter


def measure(monitored: bool, paths: dict[str, str], args) -> dict:
    return run_apart(__file__, "on" if monitored else "off", paths, args, "--device", args.device)


def point_costs(points: list[dict]) -> dict[str, float]:
    """The median seconds of the base point, of the later points with a render and of those without."""
    later = points[1:]
    with_render = [p["seconds"] for p in later if p["render"]]
    without = [p["seconds"] for p in later if not p["render"]]
    plain = statistics.median(without) if without else float("nan")
    return {"base": points[0]["seconds"], "render": statistics.median(with_render) if with_render else plain,
            "plain": plain}


def share(costs: dict[str, float], step_s: float, steps: int, save_every: int, stop_when_memorizing: bool) -> dict:
    """The monitor's seconds and share of a run of `steps` steps on the default schedule, at these costs."""
    from dreambooth_ext.config import default_config
    from dreambooth_ext.train.monitor import is_point, is_save

    config = default_config(max_train_steps=steps, save_every_n_steps=save_every,
                            stop_when_memorizing=stop_when_memorizing, concepts=[{"instance_dir": "photos"}])
    later = [s for s in range(1, steps + 1) if is_point(config, s, steps)]
    renders = sum(stop_when_memorizing or is_save(config, s, steps) for s in later)
    seconds = costs["base"] + renders * costs["render"] + (len(later) - renders) * costs["plain"]
    return {"points": len(later) + 1, "renders": renders + 1, "seconds": seconds,
            "share": seconds / (seconds + steps * step_s)}


def cached_bytes(resolution: int, training_pictures: int) -> dict[str, int]:
    """What the monitor keeps between points: its base predictions (CLASS_PICTURES latents in fp32) and the
    latents of the training pictures and of up to FIT_PICTURES held-out ones."""
    from dreambooth_ext.train.monitor import CLASS_PICTURES, FIT_PICTURES

    latent = 4 * (resolution // 8) ** 2 * 4
    return {"base predictions": CLASS_PICTURES * latent, "training latents": training_pictures * latent,
            "held-out latents (at most)": FIT_PICTURES * latent}


def report(results: dict[str, list[dict]], args, pictures: int) -> list[str]:
    off = {k: min(r[k] for r in results["off"]) for k in ("total_s", "step_s", "peak_mib")}
    on = {k: min(r[k] for r in results["on"]) for k in ("total_s", "step_s", "peak_mib")}
    points = results["on"][0]["points"]
    costs = {k: min(point_costs(r["points"])[k] for r in results["on"]) for k in ("base", "render", "plain")}
    where = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads, times in CPU seconds of the process")
    lines = [f"The learning monitor's cost: SD1.5-shaped model (widths / {args.shrink}), {args.resolution} px, "
             f"{pictures} training pictures + class images, {args.steps} steps, {where}, best of {args.repeats} "
             "interleaved runs each",
             f"{'run':22} {'total s':>8} {'step s':>8} {'peak RSS MiB':>13} {'GPU peak GiB':>13}"]
    for name, figures, runs in (("monitor off", off, results["off"]), ("monitor at defaults", on, results["on"])):
        gpu = min((r["gpu_gib"] for r in runs if r["gpu_gib"] is not None), default=None)
        lines.append(f"{name:22} {figures['total_s']:8.2f} {figures['step_s']:8.3f} {figures['peak_mib']:13.0f} "
                     f"{gpu if gpu is not None else float('nan'):13.2f}")
    lines.append(f"This run: {len(points)} points ({sum(p['render'] for p in points)} with a render), "
                 f"{on['total_s'] - off['total_s']:+.2f} s in all; peak RSS {on['peak_mib'] - off['peak_mib']:+.0f} "
                 "MiB with the monitor")
    lines.append(f"A point: the base {costs['base']:.2f} s (its pictures and captions encoded too), with a render "
                 f"{costs['render']:.2f} s, without {costs['plain']:.2f} s = {costs['plain'] / on['step_s']:.1f} "
                 "steps")
    for name, steps, save_every, stop in SCHEDULES:
        figures = share(costs, on["step_s"], steps, save_every, stop)
        verdict = f"<= {GOAL:.0%}: {'met' if figures['share'] <= GOAL else 'NOT met'}" if not save_every and not stop \
            else ""
        lines.append(f"  {name:46} {figures['points']:3d} points, {figures['renders']:3d} renders, "
                     f"{figures['seconds']:7.1f} s: {figures['share']:5.1%} of the run  {verdict}")
    kept = cached_bytes(args.resolution, pictures)
    lines.append("Kept between points: " + ", ".join(f"{name} {size / 1024:.0f} KiB" for name, size in kept.items()))
    return lines


def figures(args) -> list[str]:
    """Both runs, interleaved and repeated, each in its own process; the report's lines."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare(Path(tmp), args.shrink, args.resolution)
        pictures = len(os.listdir(paths["images"]))
        results: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(args.repeats):
            for monitored in (False, True):
                results["on" if monitored else "off"].append(measure(monitored, paths, args))
                print(f"  monitor {'on' if monitored else 'off'}: {results['on' if monitored else 'off'][-1]}",
                      file=sys.stderr)
    return report(results, args, pictures)


def parser() -> argparse.ArgumentParser:
    parsed = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parsed, steps=20)
    parsed.add_argument("--device", default="cpu")
    return parsed


def main() -> None:
    args = parser().parse_args()
    if args.run:
        from dreambooth_ext.process import keep_freed_memory

        keep_freed_memory()  # as `python -m dreambooth_ext` runs
        print(json.dumps(run_one(args, args.run == "on")))
        return
    print("\n".join(figures(args)))


if __name__ == "__main__":
    main()
