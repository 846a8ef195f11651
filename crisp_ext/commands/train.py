"""``crisp-ext train``: train a picker on curated picks and save a model directory (``OUT/model``)."""

from __future__ import annotations

import contextlib
import time

from . import common

NAME = "train"


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="train a picker on curated picks and save a model directory")
    common.add_common(p, picks_required=True)
    common.add_training(p)
    common.add_output_options(p, "output directory (the model goes to OUT/model)")
    common.add_placement_options(p, "where training runs (default: this process)",
                                 "local:1 a worker process here (on its own GPU when there is one), or slurm:1 "
                                 "a batch job (also pbs, sge, lsf, ...): the training runs there, once")


def run(args) -> int:
    with contextlib.ExitStack() as stack:
        return _run(args, stack)


def _run(args, stack) -> int:
    from ..config import save_config
    from ..pipeline import prepare_picker

    cfg = common.build_config(args)
    where = common.placement(args)
    if where is not None and where.workers != 1:
        from ..errors import InputError

        raise InputError(f"--workers {args.workers}: training runs once, on one worker; give {where.kind}:1")
    mics, picks = common.read_inputs(args, cfg, need_picks=True)
    train_ids = common.ids_for(common.names(args.train_mics), mics)
    val_ids = common.ids_for(common.names(args.val_mics), mics)
    reference = common.reference(args, picks)
    common.use_output_dir(args, stack)
    out = args.out
    save_config(cfg, out / "config.toml")
    t0 = time.perf_counter()
    kwargs = dict(micrographs=mics, work_dir=out, particles=picks, reference=reference, train_ids=train_ids,
                  val_ids=val_ids)
    progress = common.progress(args)
    from ..remote_training import trained_summary, train_on_workers

    if where is None:
        trained = trained_summary(prepare_picker(config=cfg, progress=progress, **kwargs))
    else:
        from ..progress import ProgressEvent

        trained = train_on_workers(where, kwargs, cfg, progress=progress,
                                   say=lambda text: progress(ProgressEvent("train", message=text)))
    v = trained["validation"].get("picking", {})
    where_text = f" on worker {trained['worker']}" if "worker" in trained else ""
    common.say(args, f"model written to {trained['model_dir']}  ({time.perf_counter() - t0:.0f} s{where_text}); "
                     f"labels: {trained['labels']}")
    if v:
        chance = trained["validation"].get("chance_f1")
        common.say(args, f"validation: precision {v['precision']:.3f}  recall {v['recall']:.3f}  F1 {v['f1']:.3f}"
                         f"{f' (by chance {chance:.3f})' if chance is not None else ''}  AP {v['ap']:.3f}  "
                         f"(finder {trained['finder']}, threshold {trained['threshold']:.3g})")
    return 0
