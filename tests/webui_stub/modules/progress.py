"""Stand-in for modules.progress: the task queue bookkeeping and what /internal/progress answers."""

import random
import string
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import modules.shared as shared

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []
recorded_results = []
recorded_results_limit = 2


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def create_task_id(task_type):
    res = "".join(random.choices(string.ascii_uppercase + string.digits, k=7))
    return f"task({task_type}-{res})"


def record_results(id_task, res):
    recorded_results.append((id_task, res))
    if len(recorded_results) > recorded_results_limit:
        recorded_results.pop(0)


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


@dataclass
class ProgressRequest:
    id_task: str = None
    id_live_preview: int = -1
    live_preview: bool = True


@dataclass
class ProgressResponse:
    active: bool
    queued: bool
    completed: bool
    progress: float = None
    eta: float = None
    live_preview: str = None
    id_live_preview: int = None
    textinfo: str = None

    def dict(self):
        return asdict(self)


def progressapi(req: ProgressRequest) -> ProgressResponse:
    active = req.id_task == current_task
    queued = req.id_task in pending_tasks
    completed = req.id_task in finished_tasks
    if not active:
        textinfo = "Waiting..."
        if queued:
            sorted_queued = sorted(pending_tasks.keys(), key=lambda x: pending_tasks[x])
            textinfo = f"In queue: {sorted_queued.index(req.id_task) + 1}/{len(sorted_queued)}"
        return ProgressResponse(active=active, queued=queued, completed=completed, id_live_preview=-1,
                                textinfo=textinfo)
    progress = 0
    job_count, job_no = shared.state.job_count, shared.state.job_no
    sampling_steps, sampling_step = shared.state.sampling_steps, shared.state.sampling_step
    if job_count > 0:
        progress += job_no / job_count
    if sampling_steps > 0 and job_count > 0:
        progress += 1 / job_count * sampling_step / sampling_steps
    progress = min(progress, 1)
    elapsed_since_start = time.time() - shared.state.time_start
    predicted_duration = elapsed_since_start / progress if progress > 0 else None
    eta = predicted_duration - elapsed_since_start if predicted_duration is not None else None
    return ProgressResponse(active=active, queued=queued, completed=completed, progress=progress, eta=eta,
                            live_preview=None, id_live_preview=req.id_live_preview, textinfo=shared.state.textinfo)


def setup_progress_api(app):
    return app.add_api_route("/internal/progress", progressapi, methods=["POST"])
