"""The learning monitor against the ground truth of a small world (CPU): does it call each saved step what the
scores show, and does it keep the step the scores would keep?

The small built-in model taught a captioned world of toys (bench/world.py: three classes, six colours, five places;
its UNet and VAE and the judge come from the committed pack bench/data/world.safetensors), then Dreambooth runs
teach it one subject ("photo of ohwx ball": a red ball with a yellow band, always photographed in a room) and save
every eighth of the run. Every saved step is scored DreamBench's way on renders decoded by the base's VAE, by the
judge (a network taught on the world's pictures): subject fidelity (renders of "photo of ohwx ball", alone and in
each other place, show the subject's marks), prompt fidelity (renders of "photo of ohwx ball on grass", "... in
snow", ... show the asked place), class preservation (renders of "photo of ball" still show a ball, not the
subject), copying (renders' distance to the nearest photo over the photos' own). The table sets these beside the
monitor's verdict at each saved step, and its best step beside the scores' best: the saved step nearest both the
best subject and the best prompt fidelity of its run (the highest of the two ratios' minimum). The renders of each
run are saved as OUT/<run>.png (a row per saved step, the base's first).

The sweep varies the steps (each run's saves go from too few to too many), prior preservation, full vs LoRA, the
text encoder trained or not, the learning rate, and the photos' captions (naming their room or not). Every run is
given other photos of the subject as its validation_dir (the monitor's held-out gap). Four more runs (--runs) and
two options try other worlds: --photo-places photographs the subject in several places in turn, each photo captioned
with its place (the places asked are then the others); --seeds sets the renders per prompt.

    python bench/quality.py [--runs default,no-prior,...] [--steps 600] [--out DIR] [--json FILE]
                            [--photo-places "in a room,on sand"] [--seeds 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import world  # noqa: E402

from dreambooth_ext.config import from_dict  # noqa: E402
from dreambooth_ext.hosts.files import FolderHost  # noqa: E402
from dreambooth_ext.train.monitor import MONITOR_FILE  # noqa: E402
from dreambooth_ext.train.run import TrainingRun  # noqa: E402

SUBJECT_PHOTOS = 6
HELD_OUT_PHOTOS = 4  # other photos of the subject, never trained on: the monitor's held-out gap (validation_dir)
CLASS_PICTURES = 12
LEARNING_RATE = 2e-4
MONITOR_PROMPTS = "on grass\nin snow"

# name: (what it varies, the options it changes from the default run)
RUNS = {
    "default": ("full, text encoder, prior preservation", {}),
    "no-prior": ("prior preservation off", {"prior_preservation": False}),
    "lora": ("LoRA (rank 8, 10x the rate)", {"train_mode": "lora", "lora_rank": 8, "lora_save_merged": True}),
    "frozen-text": ("text encoder not trained", {"train_text_encoder": False}),
    "low-lr": ("learning rate / 3", {"lr_factor": 1 / 3}),
    "high-lr": ("learning rate x 3", {"lr_factor": 3.0}),
    "lora-high-lr": ("LoRA, learning rate x 3", {"train_mode": "lora", "lora_rank": 8, "lr_factor": 3.0}),
    "captioned": ("the photos' captions name their room", {"captioned": True}),
    "captioned-lr-x2": ("captions naming the room, learning rate x 2", {"captioned": True, "lr_factor": 2.0}),
    "captioned-frozen-text-lr-x3": ("captions naming the room, text encoder not trained, learning rate x 3",
                                    {"captioned": True, "train_text_encoder": False, "lr_factor": 3.0}),
    "captioned-lora-lr-x3": ("captions naming the room, LoRA, learning rate x 3",
                             {"captioned": True, "train_mode": "lora", "lora_rank": 8, "lr_factor": 3.0}),
    "lr-x10": ("learning rate x 10", {"lr_factor": 10.0}),
    # not in the default sweep (see the README): where the scores' swings come from, and worlds without a window
    "ema": ("EMA of the UNet (decay 0.98)", {"ema": True, "ema_decay": 0.98}),
    "frozen-text-lr-x3": ("text encoder not trained, learning rate x 3",
                          {"train_text_encoder": False, "lr_factor": 3.0}),
    "frozen-text-lr-x6": ("text encoder not trained, learning rate x 6",
                          {"train_text_encoder": False, "lr_factor": 6.0}),
    "frozen-text-lr-x12": ("text encoder not trained, learning rate x 12",
                           {"train_text_encoder": False, "lr_factor": 12.0}),
}
SWEEP = list(RUNS)[:12]


def prepare(root: Path, log=print, photo_places: tuple[str, ...] = (world.ROOM,),
            seeds: int = world.Scorer.SEEDS) -> dict:
    """The base taught the world and its judge (unpacked, or cached), the subject's photos (in `photo_places` in
    turn: in more than one, every photo's caption names its place), the class pictures, and the scorer (`seeds`
    renders per prompt)."""
    base = world.taught_base(log)
    several = len(photo_places) > 1
    subject = world.make_subject(root / "subject", SUBJECT_PHOTOS, captioned=several, places=photo_places)
    captioned = world.make_subject(root / "subject_captioned", SUBJECT_PHOTOS, captioned=True, places=photo_places)
    held_out = world.make_subject(root / "held_out", HELD_OUT_PHOTOS, seed=13, captioned=several, places=photo_places)
    classes = world.make_class_pictures(root / "classes", CLASS_PICTURES)
    bundle = world.load(base)
    photos = [Image.open(path).convert("RGB") for path in sorted(subject.glob("*.png"))]
    scorer = world.Scorer(bundle.vae, *world.load_judge(base), photos, photo_places=photo_places, seeds=seeds)
    base_scores, base_renders = scorer.score(bundle)
    log(f"the base's response to its captions: {world.caption_response(bundle):.3f} (0: it ignores them)")
    return {"base": base, "subject": subject, "captioned": captioned, "held_out": held_out, "classes": classes,
            "scorer": scorer, "base_scores": base_scores, "base_renders": base_renders}


def run_config(setup: dict, name: str, steps: int, save_every: int, options: dict,
               learning_rate: float = LEARNING_RATE) -> dict:
    options = dict(options)
    rate = learning_rate * options.pop("lr_factor", 1.0)
    photos = setup["captioned" if options.pop("captioned", False) else "subject"]
    lora = options.get("train_mode") == "lora"
    return {"project_name": name, "base_model": str(setup["base"]), "resolution": world.SIZE,
            "max_train_steps": steps, "learning_rate": rate, "lora_learning_rate": 10 * rate,
            "text_encoder_lr": rate / 2, "lora_text_encoder_lr": 5 * rate, "lr_scheduler": "constant",
            "train_batch_size": 1, "train_text_encoder": True, "prior_preservation": True,
            "save_precision": "fp32", "seed": 7, "save_every_n_steps": save_every,
            "monitor_every_n_steps": save_every, "monitor_prompts": MONITOR_PROMPTS,
            "validation_dir": str(setup["held_out"]),
            "concepts": [{"instance_dir": str(photos), "token": world.TOKEN,
                          "class_word": world.CLASS_WORD, "class_dir": str(setup["classes"]),
                          "num_class_images": CLASS_PICTURES}],
            **({"lora_save_merged": True} if lora else {}), **options}


def train(root: Path, config: dict) -> tuple[dict[int, Path], dict]:
    """Runs it; returns the saved checkpoints by step and the monitor's monitor.json."""
    host = FolderHost(root / "models")
    name, every, steps = config["project_name"], config["save_every_n_steps"], config["max_train_steps"]
    TrainingRun(from_dict(config), host).run()
    saved = sorted({*range(every, steps, every), steps}) if every else [steps]
    checkpoints = {step: host.checkpoint_path(name, step) for step in saved}
    missing = [str(p) for p in checkpoints.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"the run saved no checkpoint at {missing}")
    monitor = json.loads((host.work_dir(name) / MONITOR_FILE).read_text(encoding="utf-8"))
    return checkpoints, monitor


def score_steps(scorer, checkpoints: dict[int, Path]) -> tuple[dict[int, dict], list]:
    """Each saved step's scores, and its decoded renders (one row each)."""
    scores, rows = {}, []
    for step, path in checkpoints.items():
        step_scores, renders = scorer.score(world.load(path))
        scores[step] = step_scores.as_dict()
        rows.append(renders)
    return scores, rows


def scores_best(scores: dict[int, dict]) -> int:
    """The saved step nearest both the best subject and the best prompt fidelity among the steps scored."""
    top_subject = max(max(s["subject"] for s in scores.values()), 1e-6)
    top_prompt = max(max(s["prompt"] for s in scores.values()), 1e-6)
    return max(scores, key=lambda step: (min(scores[step]["subject"] / top_subject,
                                             scores[step]["prompt"] / top_prompt), -step))


def shortfall(scores: dict[int, dict], step: int) -> dict[str, float]:
    """How far the step's subject and prompt fidelity fall below the best of the steps scored (0.1: 10 % below)."""
    return {key: 1 - scores[step][key] / max(max(s[key] for s in scores.values()), 1e-6)
            for key in ("subject", "prompt")}


def study(root: Path, setup: dict, name: str, steps: int, save_every: int, options: dict,
          learning_rate: float = LEARNING_RATE) -> dict:
    """One run: its scores and the monitor's points at every saved step, the two best steps."""
    started = time.perf_counter()
    checkpoints, monitor = train(root, run_config(setup, name, steps, save_every, options, learning_rate))
    trained = time.perf_counter() - started
    scores, rows = score_steps(setup["scorer"], checkpoints)
    world.sheet([setup["base_renders"], *rows], root / f"{name}.png")
    points = {p["step"]: p for p in monitor["points"]}
    best = scores_best(scores)
    return {"name": name, "steps": steps, "scores": scores, "points": points,
            "monitor_best": monitor["best_step"], "scores_best": best,
            "shortfall": shortfall(scores, monitor["best_step"]) if monitor["best_step"] in scores else None,
            "train_seconds": round(trained, 1), "score_seconds": round(time.perf_counter() - started - trained, 1)}


def table(results: list[dict], base_scores) -> str:
    base = base_scores.as_dict()
    lines = ["| run | step | subject | prompt | class | copying | fit / base | memorization | class drift "
             "| prompt response | held-out gap | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| base | 0 | {base['subject']:.2f} | {base['prompt']:.2f} | {base['class']:.2f} | "
             f"{base['copying']:.2f} | | | | | | |"]
    for result in results:
        base_fit = result["points"][0]["fit"]
        for step, s in result["scores"].items():
            p = result["points"].get(step, {})
            marks = ("M" if step == result["monitor_best"] else "") + ("S" if step == result["scores_best"] else "")
            lines.append(f"| {result['name']} | {step}{' ' + marks if marks else ''} | {s['subject']:.2f} | "
                         f"{s['prompt']:.2f} | {s['class']:.2f} | {s['copying']:.2f} | "
                         f"{_num(p.get('fit'), base_fit)} | "
                         f"{_num(p.get('memorization'))} | {_num(p.get('class_drift'))} | "
                         f"{_num(p.get('prompt_response'))} | {_num(p.get('held_out_gap'))} | "
                         f"{p.get('verdict', '')} |")
    return "\n".join(lines)


def _num(value, per=None) -> str:
    if value is None:
        return ""
    return f"{value / per:.2f}" if per else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(SWEEP), help=f"runs to make, of {', '.join(RUNS)} (default: the "
                        "first 12)")
    parser.add_argument("--steps", type=int, default=600, help="steps of every run (saved every eighth)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="the figures' file (default: OUT/quality.json)")
    parser.add_argument("--photo-places", default=world.ROOM,
                        help=f"where the subject's photos are taken, in turn (of: {', '.join(world.PLACES)}; "
                        "comma-separated; in more than one, each photo's caption names its place)")
    parser.add_argument("--seeds", type=int, default=world.Scorer.SEEDS, help="renders per prompt for the scores")
    args = parser.parse_args()
    places = tuple(p.strip() for p in args.photo_places.split(","))
    unknown = [p for p in places if p not in world.PLACES]
    if unknown:
        parser.error(f"--photo-places: {', '.join(unknown)} is not a place of the world ({', '.join(world.PLACES)})")
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    started = time.perf_counter()
    setup = prepare(root, photo_places=places, seeds=args.seeds)
    accuracy = ", ".join(f"{kind} {value:.2f}" for kind, value in setup["scorer"].accuracy.items())
    print(f"base and scorer ready in {time.perf_counter() - started:.0f} s; the judge's accuracy on new pictures: "
          f"{accuracy}", flush=True)
    results = []
    for name in args.runs.split(","):
        what, options = RUNS[name]
        result = study(root, setup, name, args.steps, max(1, args.steps // 8), options)
        results.append(result)
        print(f"{name} ({what}): monitor's best step {result['monitor_best']}, the scores' {result['scores_best']} "
              f"({result['train_seconds']:.0f} s training, {result['score_seconds']:.0f} s scoring)", flush=True)
    print()
    print(table(results, setup["base_scores"]))
    print("\nM: the monitor's best step; S: the scores' best (nearest both the best subject and prompt fidelity)")
    for result in results:
        if result["shortfall"]:
            print(f"{result['name']}: the monitor's best step is {result['shortfall']['subject']:.0%} below the "
                  f"run's best subject fidelity, {result['shortfall']['prompt']:.0%} below its best prompt fidelity")
    out = args.json or root / "quality.json"
    out.write_text(json.dumps({"base": setup["base_scores"].as_dict(), "accuracy": setup["scorer"].accuracy,
                               "runs": results}, indent=1, default=str), encoding="utf-8")
    print(f"\n{time.perf_counter() - started:.0f} s in all; figures in {out}")


if __name__ == "__main__":
    main()
