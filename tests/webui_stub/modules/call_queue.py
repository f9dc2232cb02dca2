"""Stand-in for ``modules/call_queue.py``: the queue lock and the wrappers gradio callbacks go through."""

from __future__ import annotations

import html
import time
from functools import wraps

from modules import devices, errors, fifo_lock, progress, shared

queue_lock = fifo_lock.FIFOLock()


def wrap_queued_call(func):
    """Mirrors ``call_queue.wrap_queued_call``: runs ``func`` under ``queue_lock``."""
    def f(*args, **kwargs):
        with queue_lock:
            res = func(*args, **kwargs)
        return res
    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    """Mirrors ``call_queue.wrap_gradio_gpu_call``: a first argument "task(...)" is the job id (queued, then
    started/finished with ``progress``); the call runs under ``queue_lock`` between ``shared.state.begin(job=id)``
    and ``shared.state.end()``; then ``wrap_gradio_call`` resets the state flags."""
    @wraps(func)
    def f(*args, **kwargs):
        if args and type(args[0]) == str and args[0].startswith("task(") and args[0].endswith(")"):  # noqa: E721
            id_task = args[0]
            progress.add_task_to_queue(id_task)
        else:
            id_task = None
        with queue_lock:
            shared.state.begin(job=id_task)
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res
    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    """Mirrors ``call_queue.wrap_gradio_call``: afterwards resets ``skipped``, ``interrupted``,
    ``stopping_generation``, ``job_count`` and ``job``."""
    @wraps(func)
    def f(*args, **kwargs):
        try:
            res = func(*args, **kwargs)
        finally:
            shared.state.skipped = False
            shared.state.interrupted = False
            shared.state.stopping_generation = False
            shared.state.job_count = 0
            shared.state.job = ""
        return res
    return wrap_gradio_call_no_job(f, extra_outputs, add_stats)


def wrap_gradio_call_no_job(func, extra_outputs=None, add_stats=False):
    """Mirrors ``call_queue.wrap_gradio_call_no_job``: the result becomes a tuple; an exception becomes
    ``extra_outputs + ["<div class='error'>Type: message</div>"]`` (default extra_outputs [None, '']); with
    ``add_stats`` the last item (HTML) gets a "Time taken" block (the stand-in has no VRAM monitor)."""
    @wraps(func)
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        t = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            errors.report(f"Error completing request\nArguments: {args} {kwargs}"[:131072], exc_info=True)
            if extra_outputs_array is None:
                extra_outputs_array = [None, '']
            res = extra_outputs_array + [f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]
        devices.torch_gc()
        if not add_stats:
            return tuple(res)
        elapsed = time.perf_counter() - t
        res[-1] += (f"<div class='performance'><p class='time'>Time taken: <wbr><span class='measurement'>"
                    f"{elapsed % 60:.1f} sec.</span></p></div>")
        return tuple(res)
    return f
