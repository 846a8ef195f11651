"""Picking one micrograph with a trained picker: its particle size in pixels, reading it at the working scale, the
map centres are found on, and centre finding back to original pixels. Shared by the pipeline (one process) and
the Dask workers (:mod:`crisp_ext.distributed`)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .config import PickerConfig
from .preprocess import WorkingImage, diameter_in_pixels, load_working
from .types import Micrograph, Particles


def micrograph_pixel_size(mic: Micrograph, cfg: PickerConfig) -> float | None:
    """The pixel size to use: config override, the record's, or the MRC header's."""
    if cfg.preprocess.pixel_size:
        return float(cfg.preprocess.pixel_size)
    if mic.pixel_size:
        return float(mic.pixel_size)
    from .io.mrc import read_info

    return read_info(mic.path).pixel_size


def micrograph_diameter(mic: Micrograph, cfg: PickerConfig) -> float:
    """Particle diameter in original pixels of this micrograph."""
    ps = None if cfg.particle.diameter_px else micrograph_pixel_size(mic, cfg)
    return diameter_in_pixels(cfg.particle.diameter_A, cfg.particle.diameter_px, ps, where=str(mic.path))


class MicrographLoader:
    """Reads one micrograph and brings it to the working scale (a picklable callable for DataLoader workers)."""

    def __init__(self, cfg: PickerConfig):
        self.cfg = cfg

    def __call__(self, mic: Micrograph) -> WorkingImage:
        ps = micrograph_pixel_size(mic, self.cfg) if self.cfg.particle.diameter_A else (
            self.cfg.preprocess.pixel_size or mic.pixel_size)
        diameter = diameter_in_pixels(self.cfg.particle.diameter_A, self.cfg.particle.diameter_px, ps,
                                      where=str(mic.path))
        return load_working(mic.path, diameter, self.cfg.preprocess, pixel_size=ps)


def map_channel(cfg: PickerConfig) -> int:
    """The network output channel centres are found on (``centres.map``; ``auto`` not yet resolved: the last)."""
    return {"segmentation": 0, "centre": 1}.get(cfg.centres.map, cfg.output_channels() - 1)


REFINE_CHOICES = (0.0, 0.25)  # centres.refine = auto: the widths tried on the validation micrographs


def refine_width(cfg: PickerConfig) -> float:
    """``centres.refine`` in diameters (``auto`` not yet chosen, as in a model saved before the choice: 0.25)."""
    return REFINE_CHOICES[-1] if cfg.centres.refine == "auto" else float(cfg.centres.refine)


def centre_options(cfg: PickerConfig, diameter_w: float) -> dict:
    """Edge rule (with the edge margin), refinement and de-duplication at the working scale, the same for selection
    and picking. ``centres.edge_margin = auto`` not yet chosen (as in a model saved before the choice): none."""
    edge, box = cfg.centres.edge, cfg.centres.box_fraction * diameter_w
    margin = (0.0 if cfg.centres.edge_margin == "auto" else float(cfg.centres.edge_margin)) * diameter_w
    if margin > (box / 2 if edge == "drop" else 0.0):  # a wider margin: drop as if the box were twice as wide
        edge, box = "drop", 2 * margin
    return {"edge": edge, "box_px": box, "min_distance_px": cfg.centres.min_distance * diameter_w,
            "refine_sigma_px": refine_width(cfg) * diameter_w}


def pick_micrograph(prob: np.ndarray, wi: WorkingImage, mic: Micrograph, diameter_px: float, cfg: PickerConfig,
                    finder: str, params: dict, threshold: float) -> Particles:
    """Centres of one probability map in original pixels: find, edge rule, de-duplication, threshold (at the
    working scale, exactly as on the validation micrographs), best score first."""
    from .centres.postprocess import pick_centres

    diameter_w = wi.scale.length_to_working(diameter_px)
    cs = pick_centres(prob, diameter_w, finder, params, threshold, **centre_options(cfg, diameter_w)).sorted()
    xy = wi.scale.to_original(cs.xy)
    ny, nx = wi.scale.original_shape
    # Never a coordinate outside the micrograph (RELION's Extract fails the whole job on one).
    xy[:, 0] = np.clip(xy[:, 0], 0.0, nx - 1.0)
    xy[:, 1] = np.clip(xy[:, 1], 0.0, ny - 1.0)
    return Particles.for_one(mic.id, xy, cs.score)




def pick_and_save_map(prob: np.ndarray, wi: WorkingImage, mic: Micrograph, cfg: PickerConfig, finder: str,
                      params: dict, threshold: float, map_file: str | Path | None = None) -> Particles:
    """:func:`pick_micrograph` at this micrograph's particle size, and the map written as MRC (working scale) to
    ``map_file`` when one is given: one micrograph's picking, in one process or on a Dask worker alike."""
    picks = pick_micrograph(prob, wi, mic, micrograph_diameter(mic, cfg), cfg, finder, params, threshold)
    if map_file:
        from .io.mrc import write_mrc

        write_mrc(map_file, prob.astype(np.float32),
                  pixel_size=(wi.pixel_size / wi.scale.factor) if wi.pixel_size else None)
    return picks


def may_start_processes() -> bool:
    """Whether this process may start reader processes (a daemonic one, such as a Dask worker by default, may not)."""
    import multiprocessing

    return not multiprocessing.current_process().daemon


def pick_stream(model, mics: Sequence[Micrograph], cfg: PickerConfig, finder: str, params: dict, threshold: float,
                *, device=None, map_file: Callable[[Micrograph], str | Path] | None = None,
                network: AbstractContextManager | None = None, processes: bool | None = None,
                on_error: Callable[[Micrograph, Exception], Exception] | None = None
                ) -> Iterator[tuple[Micrograph, Particles, WorkingImage, float]]:
    """Pick ``mics`` in order, yielding ``(micrograph, picks, working image, time.time() its picks were found)``:
    the one loop of picking, in one process and on each Dask worker alike.

    The next micrographs are read ahead (``cfg.predict.workers`` loader processes, or as many threads where
    ``processes`` is False; by default processes only where the network runs on a GPU and this process may start
    them: on the CPU a loader process would take a core from the network, which is most of the work), and one
    micrograph's centres are found in a thread while the network predicts the next. ``map_file(mic)``: where its map
    goes (with ``predict.save_maps``). ``network``: held while the network runs. ``on_error(mic, exc)``: the
    exception to raise instead of ``exc``, which happened on ``mic`` (by default ``exc`` itself)."""
    import time
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from .predict import predict_many

    mics = list(mics)
    save = map_file if (map_file and cfg.predict.save_maps) else None

    def centres(mic: Micrograph, wi: WorkingImage, prob: np.ndarray):
        try:
            picks = pick_and_save_map(prob, wi, mic, cfg, finder, params, threshold, save(mic) if save else None)
        except Exception as exc:  # noqa: BLE001 - named by on_error
            if on_error is None:
                raise
            raise on_error(mic, exc) from None
        return mic, picks, wi, time.time()

    if processes is None:
        import torch

        from .predict import model_device

        on = torch.device(device) if device is not None else model_device(model)
        processes = on.type != "cpu" and may_start_processes()
    stream = predict_many(model, mics, MicrographLoader(cfg), cfg.predict, device, map_channel(cfg),
                          processes=processes, network=network)
    queue: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crisp-centres") as pool:
        try:
            for i in range(len(mics)):
                try:
                    mic, wi, prob = next(stream)
                except Exception as exc:  # noqa: BLE001 - named by on_error
                    if on_error is None:
                        raise
                    raise on_error(mics[i], exc) from None
                queue.append(pool.submit(centres, mic, wi, prob))
                while len(queue) > 1:
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()
        finally:
            stream.close()
