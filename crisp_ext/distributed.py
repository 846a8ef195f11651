"""Where picking runs: one process (the default), a Dask LocalCluster of worker processes (a workstation's cores, or
one worker per GPU), a batch system through dask-jobqueue (SLURM, PBS, SGE, LSF, ...), or an existing Dask
scheduler. Dask is the engine; there is no scheduler of our own.

The flow: the driver trained or loaded the picker; its model directory goes to the workers (a shared file system,
or shipped through Dask when a worker cannot see it); micrographs go out in small chunks; each worker loads the
picker once and returns each micrograph's picks; the driver hands them, one micrograph at a time, to the caller's
``on_picked`` (which writes that micrograph's output file atomically). Dask re-runs the chunks of a worker that dies
(a chunk's picks are only used when it completes, so nothing is lost or doubled) and gives up on a chunk after its
workers died three times (``distributed.scheduler.allowed-failures``).

    --workers local:N     N worker processes here (torch threads per worker: cores // N, or --threads)
    --workers slurm:N     N batch jobs of one worker each (also pbs:N, sge:N, lsf:N, oar:N, htcondor:N, moab:N);
                          queue, account, walltime, memory... from the Dask jobqueue configuration file
                          (~/.config/dask/jobqueue.yaml), overridden by --cluster-option KEY=VALUE
    --scheduler ADDRESS   an existing scheduler (tcp://host:8786) or its scheduler file (JSON)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import Aborted, InputError, RunFailed, one_line

JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster",
            "oar": "OARCluster", "htcondor": "HTCondorCluster", "moab": "MoabCluster"}

# Dask settings for the clusters crisp-ext starts (local workers, batch jobs; not an existing scheduler's). Dask's
# statistical profiler samples every thread of a worker every 10 ms and its monitors poll every 20-500 ms, for a
# dashboard nobody looks at during a batch job: measured on the 2-core test machine, 0.06-0.09 CPU-s per micrograph
# in the worker (of ~0.7) and 0.02 in the driver, which two workers on two cores pay in throughput.
DASK_SETTINGS = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "500ms",
                 "distributed.admin.system-monitor.interval": "5s", "distributed.worker.memory.monitor-interval": "1s"}


def worker_settings(threads: int = 1) -> dict[str, Any]:
    """:data:`DASK_SETTINGS` and the environment nannies give the worker processes they start: Dask's own
    (``distributed.nanny.pre-spawn-environ``, which sets ``MALLOC_TRIM_THRESHOLD_=65536`` and one OpenMP/BLAS thread)
    with crisp-ext's glibc heap settings (:mod:`crisp_ext.allocator`) instead, except those the user set in this
    environment, and ``threads`` OpenMP/BLAS threads per worker."""
    import dask

    from .allocator import glibc_environment

    __import__("distributed")  # its defaults (the nannies' environment among them) join Dask's configuration

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.update({k: v for k, v in glibc_environment().items() if k not in os.environ})
    environ.update({k: int(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    return {**DASK_SETTINGS, "distributed.nanny.pre-spawn-environ": environ}


def dask_env_exports(settings: dict[str, Any]) -> list[str]:
    """``export DASK_...=value`` lines that give a worker started from a job script these Dask settings (Dask reads
    a value such as a dictionary as a Python literal)."""
    import shlex

    return [f"export DASK_{key.upper().replace('.', '__').replace('-', '_')}={shlex.quote(str(value))}"
            for key, value in settings.items()]


@dataclass(frozen=True)
class Placement:
    """Where picking runs. ``kind``: ``local`` | a key of :data:`JOBQUEUE` | ``scheduler``."""

    kind: str
    workers: int = 1
    address: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # jobqueue cluster keyword arguments


def parse_placement(workers: str | None, scheduler: str | None = None,
                    options: Sequence[str] = ()) -> Placement | None:
    """``--workers local:N|slurm:N|...`` or ``--scheduler ADDRESS|FILE`` (not both); None = one process."""
    from .config import parse_overrides

    if workers and scheduler:
        raise InputError("give either --workers or --scheduler, not both")
    extra = parse_overrides(options)
    if scheduler:
        return Placement("scheduler", address=str(scheduler).strip(), options=extra)
    if not workers:
        if extra:
            raise InputError("--cluster-option needs --workers with a batch system, e.g. --workers slurm:4")
        return None
    m = re.fullmatch(r"\s*([a-z]+)\s*:\s*(\d+)\s*", str(workers).lower())
    if not m or (m.group(1) != "local" and m.group(1) not in JOBQUEUE) or int(m.group(2)) < 1:
        raise InputError(f"--workers {workers!r}: give local:N or a batch system as slurm:N (also "
                         f"{', '.join(k for k in JOBQUEUE if k != 'slurm')}), N >= 1")
    if m.group(1) == "local" and extra:
        raise InputError("--cluster-option is for batch systems (--workers slurm:N), not local workers")
    return Placement(m.group(1), int(m.group(2)), options=extra)


def available_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch CUDA at all
        return 0


def threads_per_worker(placement: Placement, threads: int | None) -> int:
    """Torch threads each worker uses: the given number, else this machine's cores shared among local workers
    (so that together they never oversubscribe the cores), else the batch job's cores."""
    from .train import available_cores

    if threads:
        return int(threads)
    if placement.kind == "local":
        return max(1, available_cores() // placement.workers)
    if placement.kind in JOBQUEUE:
        return max(1, int(placement.options.get("cores", 1)))
    return 1


@contextlib.contextmanager
def open_client(placement: Placement, threads: int, progress=None) -> Iterator[Any]:
    """A Dask client on the cluster ``placement`` describes, with at least one worker up (batch jobs and an existing
    scheduler are waited for, up to 10 minutes), closed (and the cluster shut down) afterwards."""
    from distributed import Client

    import dask

    say = progress or (lambda message: None)
    cluster = None
    # read by the scheduler, nannies and workers as they start; an existing scheduler's workers keep their own
    with _environment_given_back(), dask.config.set(worker_settings(threads) if placement.kind != "scheduler" else {}):
        try:
            if placement.kind == "scheduler":
                address = placement.address
                if address and Path(address).is_file():
                    client = Client(scheduler_file=address, timeout="30s")
                else:
                    client = Client(address, timeout="30s")
                say(f"connected to the Dask scheduler {client.scheduler.address}")
            elif placement.kind == "local":
                cluster = _local_cluster(placement.workers, threads, say)
                client = Client(cluster)
            else:
                cluster = _jobqueue_cluster(placement, threads)
                cluster.scale(jobs=placement.workers)
                client = Client(cluster)
                say(f"submitted {placement.workers} {placement.kind} job(s) for Dask workers; waiting for the first")
        except (OSError, TimeoutError) as exc:
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close()
            raise RunFailed(f"cannot reach the Dask scheduler ({one_line(exc)}); check --scheduler / --workers"
                            ) from None
        try:
            if placement.kind in JOBQUEUE or placement.kind == "scheduler":
                with contextlib.suppress(TimeoutError, OSError):
                    client.wait_for_workers(1, timeout=600)
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.close()
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close()


@contextlib.contextmanager
def _environment_given_back() -> Iterator[None]:
    """This process's environment as it was, afterwards: a nanny in this process copies the environment it gives
    its worker (``distributed.nanny.pre-spawn-environ``) into ``os.environ`` for good, where it would pass to any
    process started from here later, and would read as the user's own setting at the next cluster."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in before]:
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _local_cluster(n: int, threads: int, say):
    from distributed import LocalCluster, Nanny, SpecCluster

    # each worker's OpenMP/BLAS threads come with the nannies' environment (worker_settings, set by open_client)
    gpus = available_gpus()
    if gpus:  # one worker per GPU, each pinned to its own device
        n = min(n, gpus)
        say(f"{n} local Dask worker(s), one per GPU")
        from distributed import Scheduler

        workers = {f"gpu{i}": {"cls": Nanny, "options": {"nthreads": 1, "name": f"gpu{i}",
                                                          "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
                   for i in range(n)}
        return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})
    say(f"{n} local Dask worker process(es), {threads} torch thread(s) each")
    return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40)


def _jobqueue_cluster(placement: Placement, threads: int):
    import sys

    import dask
    import dask_jobqueue

    cls = getattr(dask_jobqueue, JOBQUEUE[placement.kind])
    conf = dask.config.get(f"jobqueue.{placement.kind}", default={}) or {}
    kwargs: dict[str, Any] = {"processes": 1, "python": sys.executable}
    if not conf.get("cores"):
        kwargs["cores"] = threads
    if not conf.get("memory"):
        kwargs["memory"] = "4GiB"
    kwargs.update(placement.options)
    kwargs.setdefault("job_script_prologue", []).extend([f"export OMP_NUM_THREADS={threads}",
                                                          *dask_env_exports(worker_settings(threads))])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"--workers {placement.kind}:{placement.workers}: {one_line(exc)} (see the Dask jobqueue "
                         f"configuration and --cluster-option)") from None


# -- the workers' side ---------------------------------------------------------------------------------------------

_PICKERS: dict[str, Any] = {}  # per worker process: model key -> (model, device)
_LOADING = threading.Lock()  # one load per worker process, however many chunks start at once
# One chunk at a time runs the network: a worker with several task slots (a jobqueue worker's nthreads is its cores,
# an existing scheduler's workers may have any) would otherwise run one network per slot, each with all the cores.
_NETWORK = threading.Lock()


def _worker_model(model_ref: tuple, threads: int):
    """The picker's network in this worker, loaded once (from the shared path, or from the shipped bytes)."""
    with _LOADING:
        return _load_worker_model(model_ref, threads)


def _load_worker_model(model_ref: tuple, threads: int):
    kind, value, key = model_ref
    if key in _PICKERS:
        return _PICKERS[key]
    import torch

    from .model_dir import load_model_dir
    from .train import configure_threads

    configure_threads(max(1, int(threads)))
    if kind == "bytes":
        import tempfile

        folder = Path(tempfile.gettempdir()) / f"crisp-ext-model-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in value.items():
            if not (folder / name).is_file():
                tmp = folder / f".{name}.{os.getpid()}"
                tmp.write_bytes(data)
                os.replace(tmp, folder / name)
        path = folder
    else:
        path = Path(value)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model_dir(path, device=device)
    _PICKERS[key] = (loaded.model, device)
    return _PICKERS[key]


def pick_chunk(model_ref: tuple, cfg_dict: dict, finder: str, params: dict, threshold: float, mics: list,
               threads: int, maps: list | None) -> tuple[list[tuple], tuple[float, float]]:
    """Pick ``mics`` in a worker: ``([(micrograph id, xy, score, worker name), ...], (first, end))``, the wall-clock
    times (``time.time()``) at which the first micrograph was picked and the last. An error names the micrograph it
    happened on."""
    import time

    from .config import PickerConfig
    from .picking import pick_stream

    model, device = _worker_model(model_ref, threads)
    cfg = PickerConfig.from_dict(cfg_dict)
    name = worker_name()
    map_of = dict(zip((m.id for m in mics), maps or []))

    def named(mic, exc: Exception) -> Exception:
        if isinstance(exc, InputError):
            return InputError(f"{mic.path}: {exc}" if str(mic.path) not in str(exc) else str(exc))
        return RunFailed(f"{mic.path}: picking failed on worker {name}: {type(exc).__name__}: {one_line(exc)}")

    # the loop of one process, reading in a thread: a loader process per chunk (non-daemonic workers) made one
    # worker 0.84 s per micrograph instead of 0.56 (measured; a fork of the worker's whole heap at every chunk)
    rows, times = [], []
    map_file = (lambda m: map_of[m.id]) if maps else None
    for mic, picks, _, at in pick_stream(model, mics, cfg, finder, params, threshold, device=device,
                                         map_file=map_file, network=_NETWORK, on_error=named, processes=False):
        rows.append((mic.id, picks.xy, picks.score, name))
        times.append(at)
    return rows, (times[0] if times else time.time(), times[-1] if times else time.time())


def worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return f"pid{os.getpid()}"


# -- the driver's side ---------------------------------------------------------------------------------------------

def chunk_sizes(n: int, workers: int, largest: int = 8) -> list[int]:
    """Micrographs per chunk, in the order the chunks are submitted: each at most ``largest`` and at most half of
    an even share of what is left, so that chunks shrink towards the end and the workers finish together rather
    than one idling while another picks its last large chunk."""
    sizes, left = [], n
    while left > 0:
        sizes.append(max(1, min(largest, math.ceil(left / (2 * max(1, workers))))))
        left -= sizes[-1]
    return sizes


def _model_ref(client, model_dir: Path, say) -> tuple:
    """How workers get the model: its path when every worker sees it, else its files shipped through Dask."""
    weights = str(Path(model_dir).resolve() / "weights.pt")
    key = hashlib.sha256((str(Path(model_dir).resolve()) + str(os.path.getmtime(weights))).encode()).hexdigest()[:16]
    seen = client.run(os.path.isfile, weights)
    if seen and all(seen.values()):
        return ("path", str(Path(model_dir).resolve()), key)
    say(f"{sum(not v for v in seen.values())} worker(s) cannot see {model_dir}: shipping the model through Dask")
    files = {name: (Path(model_dir) / name).read_bytes() for name in ("model.json", "config.toml", "weights.pt")}
    return ("bytes", files, key)


def pick_distributed(picker, todo: Sequence, placement: Placement, *, map_path: Callable | None,
                     should_abort: Callable[[], bool], say: Callable[[str], None]
                     ) -> Iterator[tuple[list[tuple[Any, np.ndarray, np.ndarray, str]], tuple[float, float]]]:
    """Yield, for each chunk of ``todo`` as it completes, its ``[(micrograph, xy, score, worker name), ...]`` and
    when its worker had picked the first of them and the last (``time.time()``)."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError

    cfg = picker.config
    threads = threads_per_worker(placement, cfg.train.threads)
    by_id = {m.id: m for m in todo}
    with open_client(placement, threads, say) as client:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        n_workers = max(1, len(workers) or placement.workers)
        slots = max(n_workers, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        model_ref = _model_ref(client, picker.model_dir, say)
        if model_ref[0] == "bytes":
            model_ref = (model_ref[0], client.scatter(model_ref[1], broadcast=True), model_ref[2])
        sizes = chunk_sizes(len(todo), slots)
        starts = np.cumsum([0, *sizes])
        chunks = [list(todo[a:b]) for a, b in zip(starts[:-1], starts[1:])]
        cfg_dict = cfg.to_dict()
        futures = [client.submit(pick_chunk, model_ref, cfg_dict, picker.finder, picker.params, picker.threshold,
                                 chunk, threads, [str(map_path(m)) if map_path else None for m in chunk]
                                 if cfg.predict.save_maps else None, pure=False, key=f"crisp-pick-{k}")
                   for k, chunk in enumerate(chunks)]
        say(f"picking {len(todo)} micrograph(s) in {len(chunks)} chunk(s) of up to {max(sizes)} on {n_workers} "
            f"worker(s)")
        pending = as_completed(futures, with_results=False)
        try:
            for future in pending:
                if should_abort():
                    raise Aborted("aborted while picking on the Dask workers")
                try:
                    rows, span = future.result()
                except (InputError, RunFailed):
                    raise
                except FutureCancelledError:
                    raise RunFailed("the Dask scheduler cancelled the picking (lost scheduler?)") from None
                except Exception as exc:  # KilledWorker, lost scheduler, communication errors
                    raise RunFailed(f"picking on Dask failed: {type(exc).__name__}: {one_line(exc)}") from None
                yield [(by_id[mid], xy, score, worker) for mid, xy, score, worker in rows], span
        finally:
            for f in futures:
                f.release()
            with contextlib.suppress(Exception):
                client.cancel(futures)

