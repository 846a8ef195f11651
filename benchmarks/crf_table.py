"""Does the dense CRF pay on real data? A table like CRISP's table 2 on EMPIAR-10017, plus picking and cost.

    python benchmarks/crf_table.py [--data DIR] [--out bench_out/crf_table] [--base DIR] [--threads 1]
        [--variants none,std-mf,std-fw,cd-mf,cd-fw,cdfeat] [--modes tile,stitched] [--cost-threads 1,2]

1. Base network: the default config (``crf.kind = none``) trained on the README's 4 training micrographs,
   validated on its 2, in ``--base`` (default ``OUT/base``); a finished checkpoint there is reused.
2. Each CRF variant is fine-tuned from that same base by ``train_model`` itself: the base's finished CNN-phase
   checkpoint is copied into the variant's folder under the variant's fingerprint, so ``train_model`` resumes after
   the CNN phase and runs exactly the pipeline's CRF phase (``crf.finetune_epochs``, ``param_groups(lr_cnn,
   lr_crf)``, best epoch by validation IoU, epoch 0 = the base wrapped in the untrained CRF). A finished variant
   folder is reused. The CRF's parameters are printed before (as built from the config) and after (best epoch
   and last epoch).
3. Every model predicts the 2 validation and the 14 test micrographs, per tile (``predict_map`` on the wrapped
   model, as the pipeline does) and, for CRF models, ``stitched``: the network per tile, blended, then the CRF once
   on the whole micrograph (``CRFSegmenter.refine``). Reported on the test set: pixel IoU / F1 / precision /
   recall at 0.5 against plain disk labels (pooled), the probability mass in [0.1, 0.9] (less = more bimodal), and
   picking: finder, parameters and threshold chosen on the validation maps exactly as the pipeline does
   (``select_finder`` over ``centres.finder = auto`` with ``pipeline.centre_options``: centroid refinement at
   ``centres.refine`` D, edge rule, de-duplication), then ``pick_centres`` on each test map; precision / recall
   / F1 at that threshold and AP over all ranked picks, one-to-one matching within D/2 and within D/4.
4. Cost per micrograph at the working scale (910²): prediction of the network alone, per tile with the CRF and
   stitched, and the CRF alone on a whole map (median of ``--repeat`` runs after a warm-up), at each of
   ``--cost-threads``.

Writes ``OUT/crf_table.json`` and ``OUT/crf_table.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval_empiar10017 import load_set, split_names  # noqa: E402

from crisp_ext.centres.postprocess import pick_centres  # noqa: E402
from crisp_ext.centres.select import DEFAULT_FINDERS, select_finder  # noqa: E402
from crisp_ext.config import PickerConfig  # noqa: E402
from crisp_ext.crf import CRFSegmenter, build_crf_segmenter  # noqa: E402
from crisp_ext.metrics import picking_metrics  # noqa: E402
from crisp_ext.model import build_model, size_multiple  # noqa: E402
from crisp_ext.pipeline import centre_options  # noqa: E402
from crisp_ext.predict import autocast_context, model_device, predict_map, tile_layout  # noqa: E402
from crisp_ext.train import _fingerprint, evaluate_maps, train_model  # noqa: E402

VARIANTS = {  # name: (label, crf overrides)
    "none": ("no CRF", {"crf.kind": "none"}),
    "std-mf": ("CRF (intensity), MF", {"crf.kind": "standard", "crf.solver": "mf"}),
    "std-fw": ("CRF (intensity), FW", {"crf.kind": "standard", "crf.solver": "fw"}),
    "cd-mf": ("CD-CRF (logits), MF", {"crf.kind": "cd", "crf.cd_guide": "logits", "crf.solver": "mf"}),
    "cd-fw": ("CD-CRF (logits), FW", {"crf.kind": "cd", "crf.cd_guide": "logits", "crf.solver": "fw"}),
    "cdfeat": ("CD-CRF (decoder features)", {"crf.kind": "cd", "crf.cd_guide": "features"}),  # solver: the better
}


def _log(msg: str) -> None:
    print(msg, flush=True)


# -- prediction ----------------------------------------------------------------------------------------------------


def predict_stitched(seg: CRFSegmenter, image: np.ndarray, cfg) -> np.ndarray:
    """The network per tile (blended probabilities, and decoder features for the features guide), then the CRF
    once on the whole micrograph. Same tiles and blending as :func:`crisp_ext.predict.predict_map`."""
    device = model_device(seg)
    multiple = size_multiple(seg)
    h, w = image.shape
    th, tw, rows, cols, (hp, wp), window = tile_layout(h, w, cfg, multiple)
    window = torch.from_numpy(window)
    padded = np.pad(image, ((0, hp - h), (0, wp - w)), mode="reflect") if (hp, wp) != (h, w) else image
    feats = seg.project is not None
    acc = norm = None
    coords = [(r, c) for r in rows for c in cols]
    seg.eval()
    with torch.inference_mode():
        with autocast_context(device, bool(cfg.bf16)):
            for i in range(0, len(coords), max(1, int(cfg.batch_size))):
                chunk = coords[i:i + int(cfg.batch_size)]
                x = torch.from_numpy(np.stack([padded[r:r + th, c:c + tw] for r, c in chunk]))[:, None].to(device)
                logits, decoded = seg.network(x)
                parts = [torch.sigmoid(logits.float())] + ([decoded.float()] if feats else [])
                y = torch.cat(parts, 1).cpu()
                if acc is None:
                    acc = torch.zeros(y.shape[1], hp, wp)
                    norm = torch.zeros(hp, wp)
                for (r, c), t in zip(chunk, y):
                    acc[:, r:r + th, c:c + tw] += t * window
                    norm[r:r + th, c:c + tw] += window
        blended = (acc / norm)[:, :h, :w]
        p = blended[0].clamp(1e-6, 1 - 1e-6)
        logit = (torch.log(p) - torch.log1p(-p))[None, None].to(device)
        decoded = blended[1:][None].to(device) if feats else None
        img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
        out = seg.refine(img, logit, decoded)
    return torch.sigmoid(out.float())[0, 0].cpu().numpy()


def predict_all(model, images, cfg, mode: str) -> list[np.ndarray]:
    if mode == "tile" or not isinstance(model, CRFSegmenter):
        return [predict_map(model, im, cfg.predict) for im in images]
    return [predict_stitched(model, im, cfg.predict) for im in images]


# -- evaluation ----------------------------------------------------------------------------------------------------


def evaluate(model, cfg, val, test, mode: str) -> dict:
    d = float(cfg.preprocess.target_diameter_px)
    t0 = time.perf_counter()
    val_maps = predict_all(model, [it.image for it in val], cfg, mode)
    test_maps = predict_all(model, [it.image for it, _ in test], cfg, mode)
    predict_s = time.perf_counter() - t0
    pixels = evaluate_maps(test_maps, [plain for _, plain in test])
    uncertain = float(np.mean(np.concatenate([((m >= 0.1) & (m <= 0.9)).ravel() for m in test_maps])))
    options = centre_options(cfg, d)
    finders = DEFAULT_FINDERS if cfg.centres.finder == "auto" else (cfg.centres.finder,)
    sel = select_finder(val_maps, [it.truth_xy for it in val], d, finders=finders,
                        match_radius_px=cfg.centres.match_radius * d, objective=cfg.centres.threshold_objective,
                        params=cfg.centres.params or None, **options)
    preds, scores = [], []
    for prob in test_maps:
        cs = pick_centres(prob, d, sel.finder, sel.params, None, **options)  # all picks: AP ranks them all
        preds.append(cs.xy)
        scores.append(cs.score)
    truths = [it.truth_xy for it, _ in test]
    half = picking_metrics(preds, scores, truths, 0.5 * d, threshold=sel.threshold)
    quarter = picking_metrics(preds, scores, truths, 0.25 * d, threshold=sel.threshold)
    return {"mode": mode, "pixel": pixels, "uncertain_mass": uncertain,
            "picking": {"finder": sel.finder, "params": sel.params, "threshold": sel.threshold,
                        "val_score": sel.best.score, "D/2": half.as_dict(), "D/4": quarter.as_dict()},
            "predict_wall_s": predict_s}


# -- CRF parameters ------------------------------------------------------------------------------------------------


def crf_values(seg: CRFSegmenter) -> dict:
    """Kernel weights (after softplus), bandwidths and the feature projection's weights, as plain lists."""
    out = {f"w_{k}": [round(float(v), 5) for v in w] for k, w in seg.crf.kernel_weights().items()}
    out.update({k: round(v, 4) for k, v in seg.crf.bandwidths().items()})
    if seg.project is not None:
        out["project_weight"] = [round(float(v), 5) for v in seg.project.weight.detach().flatten()]
        out["project_bias"] = [round(float(v), 5) for v in seg.project.bias.detach().flatten()]
    return out


def initial_crf(cfg) -> CRFSegmenter:
    """The CRF wrapper as ``train_model`` builds it after a finished CNN phase (same seed, same RNG draws)."""
    torch.manual_seed(int(cfg.train.seed))
    return build_crf_segmenter(build_model(cfg.model), cfg.crf)


def max_change(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.subtract(a[k], b[k])))) for k in a)


# -- training ------------------------------------------------------------------------------------------------------


def train_base(train, val, cfg, base_dir: Path):
    t0, c0 = time.perf_counter(), time.process_time()
    result = train_model(train, val, cfg, base_dir, progress=lambda e: _log(e.line()))
    ckpt = torch.load(base_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    if ckpt["phase"] != "cnn" or not ckpt["finished"]:
        raise SystemExit(f"{base_dir}/checkpoint.pt is not a finished CNN training; remove it or give --base")
    return result, ckpt, {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def finetune(train, val, cfg, base_ckpt: dict, vdir: Path):
    """``train_model``'s CRF phase from the base weights (see the module docstring)."""
    vdir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(train, val, cfg)
    path = vdir / "checkpoint.pt"
    existing = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
    if existing is None or existing.get("fingerprint") != fingerprint:
        graft = dict(base_ckpt, fingerprint=fingerprint)
        torch.save(graft, path)
    t0, c0 = time.perf_counter(), time.process_time()
    result = train_model(train, val, cfg, vdir, progress=lambda e: _log("  " + e.line()))
    cost = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    last = torch.load(path, map_location="cpu", weights_only=False)
    last_model = copy.deepcopy(result.model)
    last_model.load_state_dict(last["model"])
    return result, last_model, cost


# -- cost ----------------------------------------------------------------------------------------------------------


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_cost(model, image: np.ndarray, cfg, threads: list[int], repeat: int) -> dict:
    out = {}
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            row = {"network": timed(lambda: predict_map(model.model if isinstance(model, CRFSegmenter) else model,
                                                        image, cfg.predict), repeat)}
            if isinstance(model, CRFSegmenter):
                row["tile"] = timed(lambda: predict_map(model, image, cfg.predict), repeat)
                row["stitched"] = timed(lambda: predict_stitched(model, image, cfg.predict), repeat)
                p = torch.from_numpy(predict_map(model.model, image, cfg.predict)).clamp(1e-6, 1 - 1e-6)
                logit = (torch.log(p) - torch.log1p(-p))[None, None]
                img = torch.from_numpy(image)[None, None]
                decoded = None
                if model.project is not None:
                    with torch.inference_mode():
                        decoded = model.network(img)[1].float()
                with torch.inference_mode():
                    row["crf_only"] = timed(lambda: model.refine(img, logit, decoded), repeat)
            out[str(n)] = row
            _log(f"  cost at {n} thread(s): " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()))
    finally:
        torch.set_num_threads(before)
    return out


# -- report --------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    threads = report["cost_threads"]
    lines = [
        "# Dense CRF on EMPIAR-10017 (test: 14 micrographs; train 4, validation 2)", "",
        f"Command: `{report['command']}`", "",
        "Pixel metrics at 0.5 against disk labels (pooled); unc. = probability mass in [0.1, 0.9]; picking: finder "
        "and threshold chosen on the validation maps as the pipeline does; P/R/F1 at that threshold, AP over all "
        "ranked picks; match radius D/2 (D/4 for the last two). Cost: seconds per 910² micrograph on this CPU "
        f"(threads {', '.join(map(str, threads))}; noisy, shared machine): CRF = the CRF alone on a whole map, "
        "pred. = the whole prediction in this mode.", "",
        "| variant | mode | best ep. | IoU | recall | F1 | unc. | finder | P | R | F1 | AP | F1 D/4 | AP D/4 | "
        + " | ".join(f"CRF {n}t | pred. {n}t" for n in threads) + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(threads),
    ]
    for name, v in report["variants"].items():
        for ev in v["eval"]:
            px, pk = ev["pixel"], ev["picking"]
            h, q = pk["D/2"], pk["D/4"]
            cost = []
            for n in threads:
                c = v.get("cost", {}).get(str(n), {})
                key = ev["mode"] if ev["mode"] in c else "network"
                cost += [f"{c['crf_only']:.2f}" if "crf_only" in c else "—", f"{c[key]:.2f}" if key in c else "—"]
            lines.append(
                f"| {v['label']} | {ev['mode']} | {v.get('best_epoch', '—')} | {px['iou']:.3f} | {px['recall']:.3f} | "
                f"{px['f1']:.3f} | {ev['uncertain_mass']:.3f} | {pk['finder']} | {h['precision']:.3f} | "
                f"{h['recall']:.3f} | {h['f1']:.3f} | {h['ap']:.3f} | {q['f1']:.3f} | {q['ap']:.3f} | "
                + " | ".join(cost) + " |")
    lines += ["", "CRF parameters (before = as built from the config; best = the epoch kept; last = last epoch):", ""]
    for name, v in report["variants"].items():
        if "crf_before" in v:
            lines.append(f"- {v['label']}: before {v['crf_before']}; best (epoch {v['best_epoch']}) "
                         f"{v['crf_best']}; last {v['crf_last']}; max |change| best {v['crf_change_best']:.4g}, "
                         f"last {v['crf_change_last']:.4g}; fine-tuning {v['finetune']['wall_s']:.0f} s wall")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/empiar10017")
    ap.add_argument("--out", type=Path, default=Path("bench_out/crf_table"))
    ap.add_argument("--base", type=Path, default=None, help="base model folder (default OUT/base); reused if done")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training and evaluation")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--modes", default="tile,stitched", help="CRF prediction modes to evaluate")
    ap.add_argument("--feature-solver", choices=("mf", "fw"), default=None,
                    help="solver of the features variant (default: the CD variant with the better validation "
                         "picking score)")
    ap.add_argument("--cost-threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = PickerConfig()
    cfg.train.threads = args.threads
    data = load_set(args.data, cfg)
    train_names, val_names, test_names = split_names(data)
    train = [data[k][0] for k in train_names]
    val = [data[k][0] for k in val_names]
    test = [data[k] for k in test_names]
    cost_image = test[0][0].image
    threads = [int(t) for t in args.cost_threads.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]

    base_dir = args.base or args.out / "base"
    _log(f"== base network in {base_dir}")
    base, base_ckpt, base_cost = train_base(train, val, cfg, base_dir)
    report = {"command": "python benchmarks/crf_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": cfg.to_dict(), "base": {"dir": str(base_dir), "best_epoch": base.best_epoch,
                                                "best_val_iou": base.best_metric, **base_cost},
              "cost_threads": threads, "working_shape": list(cost_image.shape), "variants": {}}
    for name in [v for v in args.variants.split(",") if v]:
        label, overrides = VARIANTS[name]
        if name == "cdfeat":
            solver = args.feature_solver
            if solver is None:
                scores = {s: report["variants"][f"cd-{s}"]["eval"][0]["picking"]["val_score"]
                          for s in ("mf", "fw") if f"cd-{s}" in report["variants"]}
                solver = max(scores, key=scores.get) if scores else cfg.crf.solver
            overrides = {**overrides, "crf.solver": solver}
            label = f"{label}, {solver.upper()}"
        vcfg = cfg.updated(overrides)
        _log(f"== {label}")
        entry = {"label": label, "overrides": overrides}
        if vcfg.crf.kind == "none":
            model = base.model
        else:
            result, last_model, ft_cost = finetune(train, val, vcfg, base_ckpt, args.out / "variants" / name)
            model = result.model
            before = crf_values(initial_crf(vcfg))
            best, last = crf_values(model), crf_values(last_model)
            entry.update({"best_epoch": None, "finetune": ft_cost, "crf_before": before, "crf_best": best,
                          "crf_last": last, "crf_change_best": max_change(before, best),
                          "crf_change_last": max_change(before, last)})
            hist = json.loads((args.out / "variants" / name / "history.json").read_text())
            crf_rows = [r for r in hist if r.get("phase") == "crf"]
            entry["best_epoch"] = max(crf_rows, key=lambda r: r.get("val_iou", -1))["epoch"]
            entry["val_iou_by_epoch"] = [round(r.get("val_iou", float("nan")), 4) for r in crf_rows]
            _log(f"  CRF before {before}\n  CRF best (epoch {entry['best_epoch']}) {best}\n  CRF last {last}")
            _log(f"  validation IoU by epoch {entry['val_iou_by_epoch']}")
        model.eval()
        entry["eval"] = []
        for mode in (modes if vcfg.crf.kind != "none" else ["tile"]):
            ev = evaluate(model, vcfg, val, test, mode)
            entry["eval"].append(ev)
            px, pk = ev["pixel"], ev["picking"]
            _log(f"  {mode}: IoU {px['iou']:.3f} recall {px['recall']:.3f} F1 {px['f1']:.3f} unc "
                 f"{ev['uncertain_mass']:.3f} | {pk['finder']} {pk['params']} thr {pk['threshold']:.3g}: "
                 f"P {pk['D/2']['precision']:.3f} R {pk['D/2']['recall']:.3f} F1 {pk['D/2']['f1']:.3f} "
                 f"AP {pk['D/2']['ap']:.3f} | D/4 F1 {pk['D/4']['f1']:.3f} AP {pk['D/4']['ap']:.3f}")
        entry["cost"] = measure_cost(model, cost_image, vcfg, threads, args.repeat)
        torch.set_num_threads(args.threads)
        report["variants"][name] = entry
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "crf_table.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "crf_table.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
