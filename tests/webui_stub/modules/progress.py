"""Stand-in for ``modules/progress.py``: task ids and the ``/internal/progress`` API the progress bar polls."""

from __future__ import annotations

import random
import string
import time
from collections import OrderedDict

from pydantic import BaseModel, Field

import modules.shared as shared

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []
recorded_results = []
recorded_results_limit = 2


def start_task(id_task):
    """Mirrors ``progress.start_task``: ``id_task`` becomes the current task and leaves the queue."""
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    """Mirrors ``progress.finish_task``: clears the current task and remembers the last 16 finished ones."""
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def create_task_id(task_type):
    """Mirrors ``progress.create_task_id``: "task(<type>-<7 random upper-case letters/digits>)"."""
    res = ''.join(random.choices(string.ascii_uppercase + string.digits, k=7))
    return f"task({task_type}-{res})"


def record_results(id_task, res):
    """Mirrors ``progress.record_results``."""
    recorded_results.append((id_task, res))
    if len(recorded_results) > recorded_results_limit:
        recorded_results.pop(0)


def add_task_to_queue(id_job):
    """Mirrors ``progress.add_task_to_queue``: queued since now (seconds since the epoch)."""
    pending_tasks[id_job] = time.time()


class ProgressRequest(BaseModel):
    """Mirrors ``progress.ProgressRequest``."""

    id_task: str = Field(default=None, title="Task ID")
    id_live_preview: int = Field(default=-1, title="Live preview image ID")
    live_preview: bool = Field(default=True, title="Include live preview")


class ProgressResponse(BaseModel):
    """Mirrors ``progress.ProgressResponse``: progress 0..1, eta in seconds, textinfo HTML."""

    active: bool = Field(title="Whether the task is being worked on right now")
    queued: bool = Field(title="Whether the task is in queue")
    completed: bool = Field(title="Whether the task has already finished")
    progress: float = Field(default=None, title="Progress")
    eta: float = Field(default=None, title="ETA in secs")
    live_preview: str = Field(default=None, title="Live preview image")
    id_live_preview: int = Field(default=None, title="Live preview image ID")
    textinfo: str = Field(default=None, title="Info text")


def setup_progress_api(app):
    """Mirrors ``progress.setup_progress_api``: GET /internal/pending-tasks and POST /internal/progress."""
    app.add_api_route("/internal/pending-tasks", get_pending_tasks, methods=["GET"])
    return app.add_api_route("/internal/progress", progressapi, methods=["POST"], response_model=ProgressResponse)


def get_pending_tasks():
    """Mirrors ``progress.get_pending_tasks``."""
    return {"size": len(pending_tasks), "tasks": list(pending_tasks)}


def progressapi(req: ProgressRequest):
    """Mirrors ``progress.progressapi``: progress = job_no / job_count (+ the sampling fraction), ETA from the
    time since ``state.time_start``; a live preview data URI is sent when ``state.id_live_preview`` moved (the
    stand-in sends ``state.current_image`` as PNG without the real size-dependent options)."""
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
    state = shared.state
    progress = 0
    if state.job_count > 0:
        progress += state.job_no / state.job_count
    if state.sampling_steps > 0 and state.job_count > 0:
        progress += 1 / state.job_count * state.sampling_step / state.sampling_steps
    progress = min(progress, 1)
    elapsed_since_start = time.time() - state.time_start
    predicted_duration = elapsed_since_start / progress if progress > 0 else None
    eta = predicted_duration - elapsed_since_start if predicted_duration is not None else None

    live_preview = None
    id_live_preview = req.id_live_preview
    if shared.opts.live_previews_enable and req.live_preview:
        state.set_current_image()
        if state.id_live_preview != req.id_live_preview and state.current_image is not None:
            import base64
            import io

            buffered = io.BytesIO()
            state.current_image.save(buffered, format="png")
            live_preview = "data:image/png;base64," + base64.b64encode(buffered.getvalue()).decode("ascii")
            id_live_preview = state.id_live_preview
    return ProgressResponse(active=active, queued=queued, completed=completed, progress=progress, eta=eta,
                            live_preview=live_preview, id_live_preview=id_live_preview, textinfo=state.textinfo)
