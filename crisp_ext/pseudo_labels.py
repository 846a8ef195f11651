"""Self-training (``train.self_training`` rounds): the picker's own confident picks as extra positives.

Curated picks leave particles out, and a network taught that those are background learns to miss their kind.
After the first training the picker runs on the training micrographs and on as many micrographs without picks (the
ones the user is about to pick). A pick becomes a positive where no pick of the user's lies within half a diameter
and it scores at least the *confident* threshold: the median score of the validation picks that match one of the
user's picks, i.e. it scores like a typical particle the user agrees with. (A precision target would not do: the
user's picks being incomplete, even a perfect picker's precision against them is only their completeness.) Picks
between the picking threshold and the confident one are left out of the loss (weight 0 over their disk), so
uncertain particles are taught neither way. The network is then fine-tuned from its weights; the validation
micrographs keep the user's picks only, so the finder, threshold and early stopping are still judged against them.

All coordinates here are working-scale pixels (x = column, y = row).
"""

from __future__ import annotations

import numpy as np

from .config import LabelConfig, PickerConfig
from .labels import Labels, centre_map, disk_mask, make_labels


def unpicked_micrographs(ids: list[str], with_picks: set[str], n: int, seed: int) -> list[str]:
    """Up to ``n`` of ``ids`` without picks, chosen at random (seeded), in their given order."""
    free = [m for m in ids if m not in with_picks]
    if n <= 0 or not free:
        return []
    chosen = set(np.random.default_rng(seed).permutation(len(free))[:n].tolist())
    return [m for i, m in enumerate(free) if i in chosen]


def _picks(model, image: np.ndarray, cfg: PickerConfig, diameter_w: float, selection, threshold: float):
    from .centres.postprocess import pick_centres
    from .picking import centre_options, map_channel
    from .predict import predict_maps

    prob = predict_maps(model, image, cfg.predict)[map_channel(cfg)]
    return pick_centres(prob, diameter_w, selection.finder, selection.params, threshold,
                        **centre_options(cfg, diameter_w))


def confident_threshold(val_picks, truths, radius: float, threshold: float) -> float | None:
    """The median score of the validation picks (``CentreSet`` per micrograph, at ``threshold``) that match one of
    the user's picks (``truths``, within ``radius``), at least ``threshold``; None when none matches."""
    from .metrics import match_centres

    matched = [cs.score[match_centres(cs.xy, truth, radius)[0]]
               for cs, truth in zip(val_picks, truths) if len(cs) and len(truth)]
    scores = np.concatenate(matched) if matched else np.zeros(0)
    if len(scores) == 0:
        return None
    return float(max(threshold, np.median(scores)))


def pseudo_labelled(model, item, cfg: PickerConfig, label_cfg: LabelConfig, diameter_w: float, selection,
                    threshold: float, high: float):
    """``item`` (a :class:`~crisp_ext.train.LabeledImage`; ``labels`` None for a micrograph without picks) with
    the picker's confident picks added as positives and its uncertain ones ignored; and how many were added."""
    from .train import LabeledImage

    cs = _picks(model, item.image, cfg, diameter_w, selection, threshold)
    known = np.asarray(item.truth_xy, dtype=np.float64).reshape(-1, 2)
    new = np.ones(len(cs), dtype=bool)
    if len(known) and len(cs):
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(known).query(cs.xy)
        new = dist > 0.5 * diameter_w
    confident, uncertain = cs.xy[new & (cs.score >= high)], cs.xy[new & (cs.score < high)]
    shape = item.image.shape
    if item.labels is None:
        labels = make_labels(shape, confident, diameter_w, _disks(label_cfg))
    else:
        old = item.labels
        fg = disk_mask(shape, confident, 0.5 * label_cfg.disk_fraction * diameter_w)
        target = np.maximum(old.target, fg.astype(np.float32))
        weight = old.weight.copy()
        weight[fg] = 1.0
        centre = old.centre
        if centre is not None and len(confident):
            centre = np.maximum(centre, centre_map(shape, confident, label_cfg.centre_sigma * diameter_w))
        labels = Labels(target, weight, centre)
    unsure = disk_mask(shape, uncertain, 0.5 * diameter_w) & (labels.target <= 0)
    labels.weight[unsure] = 0.0
    truth = np.vstack([known, confident]) if len(confident) else known
    return (LabeledImage(image=item.image, labels=labels, name=item.name, truth_xy=truth, diameter_px=item.diameter_px),
            int(len(confident)))


def _disks(label_cfg: LabelConfig) -> LabelConfig:
    import dataclasses

    return dataclasses.replace(label_cfg, kind="disk")
