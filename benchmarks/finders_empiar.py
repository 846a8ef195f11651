"""Each centre finder on EMPIAR-10017's test micrographs, from one trained model's probability maps.

    python benchmarks/finders_empiar.py --model RUN/model [--data DIR] [--threads 1] [--json OUT.json]

``--model`` is a crisp-ext model directory (``crisp-ext train --out RUN`` writes ``RUN/model``), trained on the
README's 4 micrographs and validated on its 2. For each finder alone (nms, trackpy, morphology) and for ``auto``
(all three, as the pipeline chooses), the finder's settings and the score threshold are chosen on the 2 validation
maps exactly as the pipeline does (``select_finder`` with ``pipeline.centre_options``: centroid refinement, edge
rule, de-duplication); the 14 test maps are then picked with them. Printed per finder: precision / recall / F1 at
that threshold and AP over all ranked picks, with one-to-one matching within D/2 (13.5 px, the usual criterion)
and within D/4, the mean distance of matched picks, and the finder's time per map (the map to centres, refinement
and de-duplication included; the selection's grid search is timed separately).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_empiar10017 import DIAMETER, split_names  # noqa: E402

from crisp_ext.centres.postprocess import pick_centres  # noqa: E402
from crisp_ext.centres.select import DEFAULT_FINDERS, select_finder  # noqa: E402
from crisp_ext.io.coords import read_coordinates  # noqa: E402
from crisp_ext.metrics import picking_metrics  # noqa: E402
from crisp_ext.model_dir import load_model_dir  # noqa: E402
from crisp_ext.pipeline import centre_options  # noqa: E402
from crisp_ext.predict import predict_map  # noqa: E402
from crisp_ext.preprocess import load_working  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="crisp-ext model directory")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/empiar10017")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model_dir(args.model, device="cpu")
    cfg = loaded.config
    d = float(cfg.preprocess.target_diameter_px)
    maps, truths = {}, {}
    t0 = time.perf_counter()
    for mrc in sorted((args.data / "micrographs").glob("*.mrc")):
        work = load_working(mrc, DIAMETER, cfg.preprocess)
        maps[mrc.stem] = predict_map(loaded.model, work.image, cfg.predict)
        truths[mrc.stem] = work.scale.to_working(read_coordinates(args.data / "coords" / f"{mrc.stem}.star").xy)
    print(f"predicted {len(maps)} maps in {time.perf_counter() - t0:.0f} s (working shape "
          f"{next(iter(maps.values())).shape}, D = {d:g} working px)", flush=True)
    _, val, test = split_names(maps)
    options = centre_options(cfg, d)

    rows = []
    for finders in [(f,) for f in DEFAULT_FINDERS] + [tuple(DEFAULT_FINDERS)]:
        t = time.perf_counter()
        sel = select_finder([maps[k] for k in val], [truths[k] for k in val], d, finders=finders,
                            match_radius_px=cfg.centres.match_radius * d, objective=cfg.centres.threshold_objective,
                            **options)
        select_s = time.perf_counter() - t
        preds, scores, times = [], [], []
        for k in test:
            t = time.perf_counter()
            cs = pick_centres(maps[k], d, sel.finder, sel.params, None, **options)
            times.append(time.perf_counter() - t)
            preds.append(cs.xy)
            scores.append(cs.score)
        tr = [truths[k] for k in test]
        half = picking_metrics(preds, scores, tr, 0.5 * d, threshold=sel.threshold)
        quarter = picking_metrics(preds, scores, tr, 0.25 * d, threshold=sel.threshold)
        name = "auto" if len(finders) > 1 else finders[0]
        row = {"finders": name, "chosen": sel.finder, "params": sel.params, "threshold": sel.threshold,
               "D/2": half.as_dict(), "D/4": quarter.as_dict(), "s_per_map": float(np.median(times)),
               "select_s": select_s, "mean_distance_working_px": half.mean_distance}
        rows.append(row)
        print(f"{name:10s} -> {sel.finder:10s} thr {sel.threshold:.3f} | D/2: P {half.precision:.3f} "
              f"R {half.recall:.3f} F1 {half.f1:.3f} AP {half.ap:.3f} dist {half.mean_distance:.2f} px | D/4: F1 "
              f"{quarter.f1:.3f} AP {quarter.ap:.3f} | {row['s_per_map']:.3f} s/map, selection {select_s:.1f} s "
              f"| {sel.params}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(args.model), "test": test, "validation": val, "rows": rows},
                                        indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
