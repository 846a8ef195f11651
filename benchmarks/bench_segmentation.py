"""Segmentation speed on this machine: training time for 16 micrographs of 4096², picking throughput, peak memory.

    python benchmarks/bench_segmentation.py [--config default|paper|both] [--part train|pick|all]
        [--epochs N] [--mics 16] [--val 6] [--pick 8] [--size 4096] [--threads N] [--set KEY=VALUE ...]
        [--workdir bench_out/seg]

Data: synthetic micrographs of ``--size``² (float32 MRC, 1.77 Å/px, particle diameter 108 px as EMPIAR-10017's
originals, so the default working scale bins them to ≈ 910²); content does not change the timings. A few are
simulated once and the rest are shifted copies with fresh noise.

* train: reads and bins the ``--mics`` training and ``--val`` validation micrographs, makes disk labels, and trains
  with the config's recipe (early stopping off, so every epoch is timed). ``--epochs N`` times the first N epochs
  and extrapolates to the config's epoch count (said so in the output).
* pick: ``predict_many`` over ``--pick`` micrograph files on the CPU, reading ahead in a thread as ``crisp-ext
  pick`` does there: read + bin + normalise + tiled prediction; centre finding is not included. Micrographs per
  second over the whole run (the first load included) and peak memory (PSS) of the process and its workers
  together (sampled every 0.5 s).
* paper config on CPU: one training step (a batch of 2 × 512² after a warm-up step, scaled to the batch of 8) and
  one 512² tile are timed and extrapolated to 16 + 6 micrographs and 50 epochs at the paper's scale (no binning:
  81 tiles per 4096² micrograph); the CRF fine-tuning phase is not included.

Each part runs in its own process so that peak memory belongs to it alone. CPU seconds are printed beside wall
seconds: on a shared machine wall time is not the cost (several torch threads on an oversubscribed CPU can run
many times slower than their CPU time suggests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THREADS = None  # --threads: CPU threads (default: all cores)
OVERRIDES: list[str] = []  # --set KEY=VALUE items, applied to the default and paper configs alike
PIXEL_SIZE = 1.77
DIAMETER = 108.0


# -- memory --------------------------------------------------------------------------------------------------------


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (a forked worker's copy-on-write memory) are split between the
    processes that share them, so the sum over processes is the memory really in use."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            continue
    return out


class PeakMemory:
    """Samples the memory (PSS) of this process plus its descendants (DataLoader workers).

    Not often: reading smaps makes the kernel walk each process's page tables, and sampling every 20 ms made
    training 1.6x slower on 2 cores (13.7 instead of 8.7 s per epoch of 16 steps)."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = os.getpid()
        while not self._stop.is_set():
            total = _pss_kb(me) + sum(_pss_kb(p) for p in _descendants(me))
            self.peak_kb = max(self.peak_kb, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024.0


# -- data ----------------------------------------------------------------------------------------------------------


def _cpu() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers are joined when a run ends)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_micrographs(workdir: Path, count: int, size: int, seed: int = 0) -> list[tuple[Path, np.ndarray]]:
    """``count`` MRC files of ``size``² with their particle centres (cached in ``workdir``)."""
    from crisp_ext.io.mrc import write_mrc
    from crisp_ext.simulate import simulate_micrograph

    workdir.mkdir(parents=True, exist_ok=True)
    out = []
    bases = []
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = workdir / f"synthetic_{size}_{i:02d}.mrc"
        coords = workdir / f"synthetic_{size}_{i:02d}.npy"
        if path.is_file() and coords.is_file():
            out.append((path, np.load(coords)))
            continue
        if len(bases) < min(2, count):
            sim = simulate_micrograph((size, size), n_particles=int(0.4 * (size / DIAMETER) ** 2),
                                      diameter_px=DIAMETER, pixel_size=PIXEL_SIZE, snr=0.01, seed=seed + len(bases))
            bases.append((sim.clean, sim.centres, float(sim.image.std())))
        clean, centres, noise = bases[i % len(bases)]
        shift = rng.integers(0, size, 2)
        image = np.roll(clean, tuple(shift[::-1]), axis=(0, 1)) + rng.normal(0, noise, clean.shape)
        xy = (centres + shift) % size
        write_mrc(path, image.astype(np.float32), pixel_size=PIXEL_SIZE)
        np.save(coords, xy)
        out.append((path, xy))
    return out


def config_for(name: str):
    from crisp_ext.config import PickerConfig, parse_overrides

    cfg = PickerConfig.paper() if name == "paper" else PickerConfig()
    cfg = cfg.updated(parse_overrides(OVERRIDES))
    cfg.model.encoder_weights = None  # timings do not depend on the starting weights; nothing is downloaded
    if THREADS:
        cfg.train.threads = THREADS
    return cfg


# -- parts -----------------------------------------------------------------------------------------------------------


def part_train(args) -> dict:
    from crisp_ext.labels import make_labels
    from crisp_ext.preprocess import load_working
    from crisp_ext.train import LabeledImage, configure_threads, train_model

    cfg = config_for(args.config)
    threads = configure_threads(cfg.train.threads)
    files = make_micrographs(args.workdir, max(args.mics + args.val, 1) if args.distinct else args.pick, args.size)
    t0 = time.perf_counter()
    items = []
    for i in range(args.mics + args.val):
        path, xy = files[i % len(files)]
        wi = load_working(path, DIAMETER, cfg.preprocess)
        lab = make_labels(wi.image.shape, wi.scale.to_working(xy), wi.scale.length_to_working(DIAMETER), cfg.labels)
        items.append(LabeledImage(wi.image, lab, f"{path.stem}_{i}", wi.scale.to_working(xy)))
    prepare = time.perf_counter() - t0
    epochs = cfg.train.epochs
    cfg.train.early_stop_patience = 0
    if args.epochs:
        cfg.train.epochs = min(args.epochs, epochs)
    cpu0 = _cpu()
    with PeakMemory() as mem:
        result = train_model(items[:args.mics], items[args.mics:], cfg, args.workdir / f"train_{args.config}",
                             resume=False)
    cpu = _cpu() - cpu0
    per_epoch = [r["train_seconds"] + r["val_seconds"] for r in result.history]
    train_only = [r["train_seconds"] for r in result.history]
    extrapolated = cfg.train.epochs < epochs
    total = float(np.mean(per_epoch)) * epochs if extrapolated else result.seconds
    return {"part": "train", "config": args.config, "threads": threads, "micrographs": args.mics,
            "validation": args.val, "working_shape": list(items[0].image.shape),
            "prepare_s": prepare, "epoch_s": float(np.mean(per_epoch)), "epoch_train_s": float(np.mean(train_only)),
            "epochs_timed": cfg.train.epochs, "epochs": epochs, "total_train_s": total + prepare,
            "extrapolated": extrapolated, "peak_mb": mem.peak_mb,
            "cpu_epoch_s": cpu / cfg.train.epochs, "cpu_total_train_s": cpu / cfg.train.epochs * epochs}


class _Loader:
    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, path):
        from crisp_ext.preprocess import load_working

        return load_working(path, DIAMETER, self.cfg.preprocess)


def part_pick(args) -> dict:
    import torch

    from crisp_ext.model import build_model
    from crisp_ext.predict import predict_many, predict_map
    from crisp_ext.train import configure_threads

    cfg = config_for(args.config)
    threads = configure_threads(cfg.train.threads)
    files = [p for p, _ in make_micrographs(args.workdir, args.pick, args.size)]
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.output_channels()).eval()
    load = _Loader(cfg)
    # breakdown, in this process, on one micrograph (after a warm-up)
    from crisp_ext.io.mrc import read_micrograph
    from crisp_ext.preprocess import to_working

    predict_map(model, load(files[0]).image, cfg.predict)
    t0 = time.perf_counter()
    image, ps = read_micrograph(files[0])
    t1 = time.perf_counter()
    wi = to_working(image, DIAMETER, cfg.preprocess, ps)
    t2 = time.perf_counter()
    predict_map(model, wi.image, cfg.predict)
    t3 = time.perf_counter()
    del image
    with PeakMemory() as mem:
        start, cpu0 = time.perf_counter(), _cpu()
        n = sum(1 for _ in predict_many(model, files, load, cfg.predict, processes=False))
        wall, cpu = time.perf_counter() - start, _cpu() - cpu0
    return {"part": "pick", "config": args.config, "threads": threads, "workers": cfg.predict.workers,
            "micrographs": n, "working_shape": list(wi.image.shape), "tile": cfg.predict.tile,
            "read_s": t1 - t0, "bin_normalise_s": t2 - t1, "predict_s": t3 - t2,
            "seconds": wall, "micrographs_per_s": n / wall, "peak_mb": mem.peak_mb, "cpu_s_per_micrograph": cpu / n}


def part_paper_cpu(args) -> dict:
    """The paper's recipe is far too slow to run on a CPU: time one step and one tile, extrapolate."""
    import torch

    from crisp_ext.losses import build_loss
    from crisp_ext.model import build_model
    from crisp_ext.predict import autocast_context, tile_starts
    from crisp_ext.train import configure_threads

    cfg = config_for("paper")
    threads = configure_threads(cfg.train.threads)
    torch.manual_seed(0)
    with PeakMemory() as mem:
        model = build_model(cfg.model, cfg.output_channels())
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        loss_fn = build_loss(cfg.train.loss)
        p, b = cfg.train.patch_size, cfg.train.batch_size
        cpu = torch.device("cpu")

        def step(batch: int) -> float:
            x = torch.randn(batch, 1, p, p)
            t = (torch.rand(batch, 1, p, p) > 0.8).float()
            t0 = time.perf_counter()
            opt.zero_grad()
            with autocast_context(cpu, cfg.train.bf16):
                out = model(x)
            loss_fn(out.float(), t, torch.ones_like(t)).backward()
            opt.step()
            return time.perf_counter() - t0

        model.train()
        step(1)
        # A full batch of 8 x 512² through U-Net++ / EfficientNet-b5 in fp32 needs more memory than a small
        # machine has: time a batch of 2 and scale linearly (CPU cost is linear in the batch).
        timed = min(b, 2)
        step_s = step(timed) * b / timed
        model.eval()
        tile = torch.randn(1, 1, cfg.predict.tile, cfg.predict.tile)
        with torch.inference_mode(), autocast_context(cpu, cfg.predict.bf16):
            model(tile)
            t0 = time.perf_counter()
            model(tile)
            tile_s = time.perf_counter() - t0
    factor = min(2.0, cfg.preprocess.target_diameter_px / DIAMETER)
    side = int(round(args.size * factor))
    tiles = len(tile_starts(side, cfg.predict.tile, cfg.predict.overlap)) ** 2
    steps = math.ceil(args.mics * cfg.train.patches_per_micrograph / b)
    epoch_s = steps * step_s + args.val * tiles * tile_s
    return {"part": "paper_cpu", "config": "paper", "threads": threads, "train_step_s": step_s,
            "batch": b, "timed_batch": timed, "patch": p, "tile_s": tile_s, "tiles_per_micrograph": tiles, "steps_per_epoch": steps,
            "epoch_s": epoch_s, "epochs": cfg.train.epochs, "total_train_s": epoch_s * cfg.train.epochs,
            "predict_s_per_micrograph": tiles * tile_s, "micrographs_per_s": 1.0 / (tiles * tile_s),
            "peak_mb": mem.peak_mb, "extrapolated": True}


def _print(r: dict) -> None:
    name = r["config"]
    if r["part"] == "train":
        how = (f"extrapolated from {r['epochs_timed']} timed epoch(s)" if r["extrapolated"]
               else "all epochs run")
        print(f"[{name}] training on {r['micrographs']} micrographs of {r['working_shape'][0]}² working px "
              f"(+{r['validation']} validation), {r['threads']} thread(s): read+bin+labels {r['prepare_s']:.1f} s, "
              f"{r['epoch_s']:.1f} s per epoch ({r['epoch_train_s']:.1f} s training, rest validation), total "
              f"{r['total_train_s']:.0f} s = {r['total_train_s'] / 60:.1f} min for {r['epochs']} epochs ({how}); "
              f"CPU time {r['cpu_epoch_s']:.1f} s per epoch, {r['cpu_total_train_s'] / 60:.1f} CPU-min in all; "
              f"peak memory {r['peak_mb']:.0f} MB")
    elif r["part"] == "pick":
        print(f"[{name}] picking {r['micrographs']} micrographs -> {r['working_shape'][0]}² working px, "
              f"{'reading ahead in a thread' if r['workers'] else 'reading in turn'}, {r['threads']} thread(s): "
              f"{r['micrographs_per_s']:.2f} micrographs/s "
              f"(one micrograph alone: read {r['read_s']:.2f} s, bin+normalise {r['bin_normalise_s']:.2f} s, "
              f"predict {r['predict_s']:.2f} s); {r['cpu_s_per_micrograph']:.2f} CPU-s per micrograph; "
              f"peak memory {r['peak_mb']:.0f} MB (process + workers)")
    else:
        print(f"[paper, CPU, extrapolated] one training step of {r['batch']} x {r['patch']}² takes "
              f"{r['train_step_s']:.1f} s (timed at a batch of {r['timed_batch']}) and one {r['patch']}² tile {r['tile_s']:.2f} s: {r['epoch_s']:.0f} s per "
              f"epoch, {r['total_train_s'] / 3600:.1f} h for {r['epochs']} epochs (without the CRF phase); picking "
              f"{r['predict_s_per_micrograph']:.0f} s per micrograph ({r['tiles_per_micrograph']} tiles) = "
              f"{r['micrographs_per_s']:.3f} micrographs/s; peak memory {r['peak_mb']:.0f} MB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("default", "paper", "both"), default="both")
    ap.add_argument("--part", choices=("train", "pick", "all", "_train", "_pick", "_paper_cpu"), default="all")
    ap.add_argument("--epochs", type=int, default=None, help="time only this many epochs and extrapolate")
    ap.add_argument("--mics", type=int, default=16)
    ap.add_argument("--val", type=int, default=6)
    ap.add_argument("--pick", type=int, default=8, help="micrographs to pick (distinct files)")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--distinct", action="store_true", help="a distinct file per training micrograph")
    ap.add_argument("--workdir", type=Path, default=Path("bench_out/seg"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override, e.g. --set train.min_patches_per_epoch=128 (repeatable)")
    args = ap.parse_args(argv)
    global THREADS, OVERRIDES
    THREADS = args.threads
    OVERRIDES = args.set

    if args.part.startswith("_"):
        fn = {"_train": part_train, "_pick": part_pick, "_paper_cpu": part_paper_cpu}[args.part]
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return 0

    import torch

    gpu = torch.cuda.is_available()
    configs = ["default", "paper"] if args.config == "both" else [args.config]
    parts = ["train", "pick"] if args.part == "all" else [args.part]
    make_micrographs(args.workdir, args.pick, args.size)  # once, before any timing
    print(f"# {os.cpu_count()} CPU core(s), CUDA {'yes' if gpu else 'no'}; synthetic {args.size}² micrographs"
          + (f"; --set {' '.join(args.set)}" if args.set else ""))
    results = []
    for name in configs:
        jobs = [f"_{p}" for p in parts]
        if name == "paper" and not gpu:
            jobs = ["_paper_cpu"]
        for job in jobs:
            cmd = [sys.executable, __file__, "--part", job, "--config", name, "--mics", str(args.mics), "--val",
                   str(args.val), "--pick", str(args.pick), "--size", str(args.size), "--workdir", str(args.workdir)]
            if args.epochs:
                cmd += ["--epochs", str(args.epochs)]
            if args.distinct:
                cmd.append("--distinct")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            for item in args.set:
                cmd += ["--set", item]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"[{name}] {job[1:]} failed (exit status {proc.returncode}; -9 = killed, e.g. out of "
                      f"memory):\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(lines[-1][7:])
            results.append(r)
            _print(r)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
