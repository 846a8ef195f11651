"""Segmentation accuracy on real data: EMPIAR-10017 (20 micrographs of 1024², 27 px particles).

Trains on the README's 4 training micrographs, validates (early stopping) on its 2, and reports the pixel IoU /
F1 / precision / recall of the predicted maps at 0.5 against disk labels (plain disks of the particle diameter, no
ignore band, whatever the training labels were) on the 14 test micrographs, pooled over micrographs, with the CPU
seconds spent training and predicting.

    python benchmarks/eval_empiar10017.py [--data DIR] [--set model.encoder=resnet18 --set train.epochs=30 ...]
        [--out DIR] [--json results.json] [--threads N] [--picking]

``--set`` takes dotted config keys (``PickerConfig.updated``); values are parsed as JSON where possible.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crisp_ext.config import LabelConfig, PickerConfig  # noqa: E402
from crisp_ext.io.coords import read_coordinates  # noqa: E402
from crisp_ext.labels import make_labels  # noqa: E402
from crisp_ext.predict import predict_map  # noqa: E402
from crisp_ext.preprocess import load_working  # noqa: E402
from crisp_ext.train import LabeledImage, evaluate_maps, train_model  # noqa: E402

DIAMETER = 27.0
PREFIX = "Falcon_2012_06_12-"
TRAIN = ["14_57_34_0", "15_07_41_0", "15_14_01_0", "15_17_31_0"]
VAL = ["15_27_22_0", "15_30_21_0"]


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_set(data: Path, cfg: PickerConfig):
    """Working-scale images with training labels (``cfg.labels``) and plain disk labels for scoring."""
    out = {}
    for mrc in sorted((data / "micrographs").glob("*.mrc")):
        work = load_working(mrc, DIAMETER, cfg.preprocess)
        xy = work.scale.to_working(read_coordinates(data / "coords" / f"{mrc.stem}.star").xy)
        d = work.scale.length_to_working(DIAMETER)
        shape = work.image.shape
        out[mrc.stem] = (LabeledImage(work.image, make_labels(shape, xy, d, cfg.labels), mrc.stem, xy),
                         make_labels(shape, xy, d, LabelConfig()))
    return out


def split_names(names) -> tuple[list[str], list[str], list[str]]:
    """The README's split of micrograph names (stems): the 4 training, the 2 validation, the rest for testing."""
    names = list(names)
    return ([PREFIX + n for n in TRAIN], [PREFIX + n for n in VAL],
            [k for k in names if k.removeprefix(PREFIX) not in TRAIN + VAL])


def _picking(model, cfg, val, test, test_maps) -> dict:
    from crisp_ext.centres.postprocess import pick_centres
    from crisp_ext.centres.select import select_finder
    from crisp_ext.metrics import picking_metrics

    d = cfg.preprocess.target_diameter_px
    val_maps = [predict_map(model, it.image, cfg.predict) for it in val]
    sel = select_finder(val_maps, [it.truth_xy for it in val], d, finders=("nms",))
    preds, scores = [], []
    for prob in test_maps:
        cs = pick_centres(prob, d, sel.finder, sel.params, sel.threshold)
        preds.append(cs.xy)
        scores.append(cs.score)
    m = picking_metrics(preds, scores, [item.truth_xy for item, _ in test], 0.5 * d)
    return {**m.as_dict(), "finder": sel.finder, "params": sel.params, "threshold": sel.threshold}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/empiar10017")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("bench_out/eval10017"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --out")
    ap.add_argument("--picking", action="store_true",
                    help="also pick centres (NMS finder chosen on the validation maps, as the pipeline does) and "
                         "report precision / recall / F1 / AP within half a diameter on the test micrographs")
    args = ap.parse_args(argv)

    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = PickerConfig().updated({k: _value(v) for k, v in overrides.items()})
    if args.threads:
        cfg.train.threads = args.threads
    data = load_set(args.data, cfg)
    train_names, val_names, test_names = split_names(data)
    train = [data[k][0] for k in train_names]
    val = [data[k][0] for k in val_names]
    test = [data[k] for k in test_names]

    cpu0 = time.process_time()
    result = train_model(train, val, cfg, args.out, progress=lambda e: print(e.line(), flush=True),
                         resume=not args.fresh)
    train_cpu = time.process_time() - cpu0
    t0, c0 = time.perf_counter(), time.process_time()
    probs = [predict_map(result.model, item.image, cfg.predict) for item, _ in test]
    predict_wall = (time.perf_counter() - t0) / len(test)
    predict_cpu = (time.process_time() - c0) / len(test)
    scores = evaluate_maps(probs, [plain for _, plain in test])
    per_mic = [evaluate_maps([p], [plain]) for p, (_, plain) in zip(probs, test)]
    picking = _picking(result.model, cfg, val, test, probs) if args.picking else None
    # the last epoch's weights too: does choosing the best validation epoch help?
    import torch

    last = torch.load(args.out / "checkpoint.pt", map_location="cpu", weights_only=False)
    result.model.load_state_dict(last["model"])
    last_scores = evaluate_maps([predict_map(result.model, item.image, cfg.predict) for item, _ in test],
                                [plain for _, plain in test])
    report = {
        "overrides": overrides,
        "config": cfg.to_dict(),
        "test_pooled": scores,
        "test_last_epoch": last_scores,
        "test_picking": picking,
        "test_mean_iou": float(np.mean([m["iou"] for m in per_mic])),
        "test_mean_f1": float(np.mean([m["f1"] for m in per_mic])),
        "best_epoch": result.best_epoch,
        "best_val": result.best_metric,
        "epochs_run": sum(1 for r in result.history if r.get("phase") == "cnn"),
        "train_wall_s": result.seconds,
        "train_cpu_s": train_cpu,
        "predict_wall_s_per_mic": predict_wall,
        "predict_cpu_s_per_mic": predict_cpu,
        "working_shape": list(test[0][0].image.shape),
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
