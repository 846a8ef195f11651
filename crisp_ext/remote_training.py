"""``crisp-ext train --workers``: the training as one Dask task on a worker (a GPU node, a batch job), its
progress relayed to the process you started through a Dask queue, an abort (Ctrl-C) through a Dask event."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

from .distributed import Placement, open_client, threads_per_worker, worker_name
from .errors import Aborted, InputError, RunFailed, one_line


def trained_summary(picker) -> dict:
    """What ``crisp-ext train`` reports of a trained picker, wherever it trained."""
    return {"model_dir": str(picker.model_dir), "labels": picker.info.get("labels", "?"),
            "validation": picker.validation, "finder": picker.finder, "threshold": picker.threshold}


def train_task(kwargs: dict, cfg_dict: dict, threads: int, queue_name: str, abort_name: str) -> dict:
    """Train in a worker (``crisp-ext train --workers``): ``prepare_picker`` with ``kwargs``, its progress sent to
    the driver through a Dask queue, an abort read from a Dask event; returns what the driver reports."""
    import time

    from distributed import Event, Queue

    from .config import PickerConfig
    from .pipeline import prepare_picker
    from .train import configure_threads

    configure_threads(threads)
    queue, abort = Queue(queue_name), Event(abort_name)
    name = worker_name()
    checked = [0.0, False]

    def progress(event) -> None:
        queue.put((event.stage, event.done, event.total, event.message, dict(event.metrics), name))

    def should_abort() -> bool:  # at most one round trip to the scheduler a second
        now = time.monotonic()
        if now - checked[0] > 1.0:
            checked[0], checked[1] = now, abort.is_set()
        return checked[1]

    cfg = PickerConfig.from_dict(cfg_dict).updated({"train.threads": threads})
    picker = prepare_picker(config=cfg, progress=progress, should_abort=should_abort, **kwargs)
    return {**trained_summary(picker), "worker": name}


def train_on_workers(placement: Placement, kwargs: dict, cfg, *, progress: Callable, say: Callable[[str], None],
                     should_abort: Callable[[], bool] = lambda: False) -> dict:
    """Run :func:`train_task` as one Dask task (a GPU node, a batch job) and relay its progress here. The
    output folder and the micrographs must be visible to the workers at the same paths. A worker that dies is
    replaced and the training resumes from its last checkpoint, as a re-run does."""
    import uuid

    from distributed import Event, Queue, TimeoutError as DaskTimeout

    from .progress import ProgressEvent

    threads = threads_per_worker(placement, cfg.train.threads)
    work_dir = str(Path(kwargs["work_dir"]).resolve())
    with open_client(placement, threads, say) as client:
        seen = client.run(os.path.isdir, work_dir)
        if not seen or not all(seen.values()):
            raise InputError(f"{work_dir}: the Dask workers cannot see this output folder; put --out on a file "
                             f"system they share")
        run_id = uuid.uuid4().hex[:12]
        queue, abort = Queue(f"crisp-train-progress-{run_id}", client=client), Event(f"crisp-train-abort-{run_id}",
                                                                                      client=client)
        future = client.submit(train_task, {**kwargs, "work_dir": work_dir}, cfg.to_dict(), threads, queue.name,
                               abort.name, pure=False, key=f"crisp-train-{run_id}")
        say(f"training on a Dask worker ({threads} torch thread(s))")

        def relay(wait: float) -> None:
            try:
                items = [queue.get(timeout=wait)]
                n = queue.qsize()
                items += queue.get(batch=n) if n else []
            except (DaskTimeout, TimeoutError):
                return
            for stage, done, total, message, metrics, _worker in items:
                progress(ProgressEvent(stage, done, total, message, metrics))

        try:
            while not future.done():
                relay(0.5)
                if should_abort() and not abort.is_set():
                    abort.set()
            relay(0.1)
            try:
                result = future.result()
            except (InputError, RunFailed, Aborted):
                raise
            except Exception as exc:  # KilledWorker, lost scheduler, communication errors
                raise RunFailed(f"training on Dask failed: {type(exc).__name__}: {one_line(exc)}") from None
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):  # stop the training on the worker, which Dask cannot kill
                abort.set()
                future.result(timeout=30)
            raise
        finally:
            future.release()
    return result
