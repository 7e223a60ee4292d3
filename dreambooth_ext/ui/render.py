"""What the tab shows, built from a job status dict: status HTML, the loss and learning monitor charts' data, the
sample gallery."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..train.run import clock

MAX_GALLERY = 16  # the newest sample images shown
# The learning monitor's signals in the chart, by their key in a point (a key not named here shows with its own name)
MONITOR_SIGNALS = {"fit": "fit (of the base's)", "memorization": "memorization", "class_drift": "class drift",
                   "prompt_response": "prompt response", "held_out_gap": "held-out gap"}
NOT_SIGNALS = ("step", "saved", "verdict")


def status_html(status: dict[str, Any], note: str = "", in_use: bool = False) -> str:
    """The status area. `data-state` is what the page's JS reads to know when to stop polling, `data-lora-names`
    the names of the LoRA files the run wrote (the WebUI's names for them), whose cards it adds to a Lora tab drawn
    before they existed; `in_use`: the host has the run's last checkpoint loaded."""
    state = status.get("state", "idle")
    loras = status.get("loras") or []
    names = f" data-lora-names='{html.escape(json.dumps([Path(p).stem for p in loras]))}'" if loras else ""
    parts = [f"<div class='dreambooth-status' data-state='{html.escape(state)}'{names}>"]
    if note:
        parts.append(f"<div class='dreambooth-note'>{html.escape(note)}</div>")
    if state == "idle":
        parts.append("<p>No training run yet.</p>")
    else:
        project = html.escape(status.get("project", ""))
        parts.append(f"<p><b>{project}</b>: {html.escape(state)}"
                     + (f" ({html.escape(status['phase'])})" if status.get("phase") not in ("", None, state) else "")
                     + "</p>")
        if status.get("message"):
            parts.append(f"<p>{html.escape(status['message'])}</p>")
        parts.append(_numbers(status))
        parts.append(_monitor_line(status.get("monitor")))
    if status.get("error"):
        parts.append(f"<div class='dreambooth-error'><b>Error</b><pre>{html.escape(status['error'])}</pre></div>")
    if status.get("warnings"):
        parts.append(dataset_report_html(status["warnings"], title="Warnings"))
    checkpoints = status.get("checkpoints") or []
    if checkpoints:
        items = "".join(f"<li><code>{html.escape(str(p))}</code></li>" for p in checkpoints)
        parts.append(f"<div class='dreambooth-checkpoints'>Checkpoints written:<ul>{items}</ul></div>")
        if in_use:
            parts.append("<p class='dreambooth-in-use'>The last one is the WebUI's loaded model: the next generation "
                         "uses it.</p>")
    if loras:
        items = "".join(f"<li><code>{html.escape(str(p))}</code></li>" for p in loras)
        prompt = html.escape(lora_prompt(loras[-1]))
        parts.append(f"<div class='dreambooth-loras'>LoRA written:<ul>{items}</ul>Add it to a prompt with "
                     f"<code class='dreambooth-lora-prompt'>{prompt}</code>. Its card is in the Lora tab of txt2img "
                     "and img2img.</div>")
    parts.append("</div>")
    return "".join(parts)


def lora_prompt(path: str) -> str:
    """The prompt text that uses a LoRA at full strength: the WebUI names it by its file name."""
    return f"<lora:{Path(path).stem}:1>"


def _monitor_line(monitor: dict[str, Any] | None) -> str:
    """The learning monitor's last verdict, its remedy and the best saved step so far."""
    if not monitor or not monitor.get("verdict"):
        return ""
    text = f"Learning monitor: {monitor['verdict']}. {monitor.get('remedy') or ''}".strip()
    if monitor.get("best_step") is not None:
        text += f" Best saved step so far: {monitor['best_step']}."
    return f"<p class='dreambooth-monitor'>{html.escape(text)}</p>"


def _numbers(status: dict[str, Any]) -> str:
    cells = []
    if status.get("total_steps"):
        cells.append(f"step {status.get('step', 0)}/{status['total_steps']}")
    elif status.get("total"):
        cells.append(f"{status.get('done', 0)}/{status['total']}")
    if status.get("loss") is not None:
        cells.append(f"loss {status['loss']:.4f}")
    if status.get("lr") is not None:
        cells.append(f"lr {status['lr']:.2e}")
    if status.get("it_per_s"):
        cells.append(f"{status['it_per_s']:.2f} it/s")
    if status.get("state") == "running" and status.get("memory_gib"):
        cells.append(f"{status['memory_gib']:.1f} GiB {status.get('memory_kind', '')}".rstrip())
    if status.get("state") == "running" and status.get("eta_s") is not None:
        cells.append(f"ETA {clock(status['eta_s'])}")
    return f"<p class='dreambooth-numbers'>{html.escape(' · '.join(cells))}</p>" if cells else ""


def dataset_report_html(warnings: list[str], errors: list[str] | None = None, title: str = "Dataset check") -> str:
    """The dataset check's findings (a run's warnings with another title): errors (training cannot work) first,
    then warnings."""
    if not warnings and not errors:
        return f"<div class='dreambooth-note'>{html.escape(title)}: no problems found.</div>"
    items = "".join(f"<li class='dreambooth-error'>{html.escape(e)}</li>" for e in errors or [])
    items += "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f"<div class='dreambooth-warning dreambooth-dataset'><b>{html.escape(title)}</b><ul>{items}</ul></div>"


def message_html(message: str, *, error: bool = False) -> str:
    css = "dreambooth-error" if error else "dreambooth-note"
    return f"<div class='{css}'><pre>{html.escape(message)}</pre></div>"


PREDICTION_NAMES = {"epsilon": "noise prediction", "v_prediction": "v-prediction"}


def model_summary_html(summary: dict[str, Any]) -> str:
    """Which checkpoint and VAE Start trains: the loaded model in the WebUI, or the one picked in the tab
    (`picked`). Keys: title, hash, family, prediction ("epsilon", "v_prediction", "" unknown), vae, problem."""
    rows = []
    if summary.get("title"):
        title = html.escape(summary["title"])
        digest = f" <code>[{html.escape(summary['hash'])}]</code>" if summary.get("hash") else ""
        kind = ", ".join(html.escape(part) for part in (summary.get("family"),
                                                         PREDICTION_NAMES.get(summary.get("prediction") or "")) if part)
        rows.append(f"<p>Checkpoint to train: <b>{title}</b>{digest}" + (f" ({kind})" if kind else "")
                    + (" — picked below, read from its file" if summary.get("picked") else "") + "</p>")
        vae = summary.get("vae") or ("its own, or the vae option" if summary.get("picked") else "the checkpoint’s own")
        rows.append(f"<p>VAE: {html.escape(vae)}</p>")
    if summary.get("note"):  # e.g. Forge holds the model quantized: it is read from its file instead
        rows.append(f"<p class='dreambooth-note'>{html.escape(summary['note'])}</p>")
    if summary.get("problem"):
        rows.append(f"<p class='dreambooth-warning'>{html.escape(summary['problem'])}</p>")
    return "<div class='dreambooth-model'>" + "".join(rows) + "</div>"


def loss_frame(status: dict[str, Any]):
    """The loss history as the DataFrame gr.LinePlot takes (columns step, loss); None before the first loss (the
    chart then draws nothing: an empty table would make its plotting library warn about an empty scale)."""
    import pandas as pd  # a gradio dependency; imported here so the engine never needs it

    losses = status.get("losses") or []
    if not losses:
        return None
    return pd.DataFrame({"step": pd.Series([s for s, _ in losses], dtype="int64"),
                         "loss": pd.Series([v for _, v in losses], dtype="float64")})


def monitor_frame(monitor: dict[str, Any] | None):
    """The learning monitor's signals over the steps, as the DataFrame gr.LinePlot takes (columns step, value,
    signal, verdict; one line per signal), each relative as the monitor reports it and the fit as a fraction of the
    base model's; a signal not measured at a point has no row there. The best saved step is a vertical line of its
    own. None before the monitor's first point (the chart is then hidden)."""
    import pandas as pd

    points = (monitor or {}).get("points") or []
    base_fit = (monitor or {}).get("base_fit")
    rows = []
    for point in points:
        for key, value in point.items():
            if key in NOT_SIGNALS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key == "fit":
                if not base_fit:
                    continue  # no base to compare with: an absolute loss would not share the others' scale
                value = value / base_fit
            rows.append((point["step"], float(value), monitor_signal_name(key), point.get("verdict") or ""))
    if not rows:
        return None
    best = monitor.get("best_step")
    if best is not None:
        top = max(1.0, max(value for _, value, _, _ in rows))
        verdict = next((p.get("verdict") or "" for p in points if p["step"] == best), "")
        rows += [(best, 0.0, best_step_name(best), verdict), (best, top, best_step_name(best), verdict)]
    steps, values, signals, verdicts = zip(*rows, strict=True)
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "value": pd.Series(values, dtype="float64"),
                         "signal": list(signals), "verdict": list(verdicts)})


def monitor_signal_name(key: str) -> str:
    return MONITOR_SIGNALS.get(key, key.replace("_", " "))


def best_step_name(step: int) -> str:
    return f"best saved step ({step})"


def monitor_caption(monitor: dict[str, Any] | None) -> str:
    """Under the monitor's chart: the last point's verdict and the best saved step so far."""
    if not monitor or not monitor.get("verdict"):
        return ""
    points = monitor.get("points") or []
    at = f" at step {points[-1]['step']}" if points else ""
    best = monitor.get("best_step")
    return (f"Verdict{at}: {monitor['verdict']}. "
            + (f"Best saved step: {best}." if best is not None else "No step saved yet."))


def gallery_items(status: dict[str, Any]) -> list[tuple[Image.Image, str]]:
    """The newest sample images as (image, caption). Images, not paths: gradio 4 refuses to serve files from
    folders it was not told about, and the samples live in the project's folder."""
    items = []
    for path in (status.get("samples") or [])[-MAX_GALLERY:]:
        try:
            with Image.open(path) as image:
                items.append((image.convert("RGB"), Path(path).name))
        except OSError:
            continue  # a sample removed since (e.g. the project was deleted): show the rest
    return items
