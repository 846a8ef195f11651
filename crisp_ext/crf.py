"""Differentiable dense CRF for the binary particle/background segmentation (pure PyTorch, CPU and GPU).

**One logit.** The network gives one logit ``u`` per pixel (``classes=1``, probability ``sigmoid(u)``). For two
labels with a class-dependent Potts compatibility ``M = [[0, w_bg], [w_fg, 0]]`` per kernel (``w_fg``: penalty for
a particle pixel among background neighbours, ``w_bg``: the converse) and a normalised Gaussian message ``F``
(``F(1) = 1``), the mean-field logit difference is a single-channel update::

    m = u + sum_k [ (w_fg_k + w_bg_k) F_k(q) - w_fg_k ]          (Potts, w_fg = w_bg = w:  u + w (2 F(q) - 1))

so each iteration filters one channel per kernel. The weights are non-negative (softplus), i.e. the interactions
are attractive; a weight of exactly 0 in the constructor removes that kernel. The paper's learnable C x C kernel
weights times the C x C compatibility reduce, for two classes and attractive Potts terms, to these two numbers per
kernel (``compatibility="class"``); ``"potts"`` ties them (one number per kernel).

**Kernels** (:mod:`crisp_ext.crf_filters`, self term excluded, border-normalised):

* smoothness ``exp(-|dp|^2 / 2 theta_gamma^2)`` by FFT: cost independent of theta_gamma, exact in theta_gamma
  (a separable convolution is 5-20x slower on CPU, see ``benchmarks/bench_crf.py``);
* appearance ``exp(-|dp|^2 / 2 theta_alpha^2 - |df|^2 / 2 theta_beta^2)`` on the guide ``f`` (theta_beta is in
  guide units: callers normalise the guide, see :func:`standardize`). Two backends, measured against the
  brute-force dense filter in ``benchmarks/bench_crf.py``:

  - ``"grid"``, a bilateral grid (spacing theta, the classic choice) for a *scalar* guide: mean error < 1 %,
    a few % at worst, of the message at any theta, cost about 0.15-0.25 s per iteration at 1024^2 on one CPU
    core; gradients for the probabilities and the guide (through the interpolation weights), not the
    bandwidths;
  - ``"window"``, a local window over cells of about theta_alpha/2 pixels reaching 2.5 theta_alpha, for guides
    with any number of channels, with exact gradients for the guide and the bandwidths. Its message is computed
    per cell and upsampled, so it blurs across guide edges narrower than a cell: errors of tens of % next to
    edges (a few % on average) against the dense filter, i.e. it is a coarser kernel, not a faithful
    approximation.

  ``"auto"`` (default) uses the grid for a 1-channel guide (micrograph, logit, features projected to one
  channel) when the bandwidths are fixed, and the window otherwise (several feature channels, learned
  bandwidths).

**Solvers** (``iterations`` steps, starting from ``x0 = sigmoid(u)``). Each step computes ``m`` from the current
``x`` and a regularised linear-minimisation oracle ``s``, then ``x <- x + a (s - x)``:

* ``"mf"``: mean field, ``s = sigmoid(m)``, ``a = 1`` (identical to Frank-Wolfe with the negative-entropy
  regulariser, lambda 1 and step 1);
* ``"fw"``: regularised Frank-Wolfe (Le-Huu & Alahari, NeurIPS 2021) with regulariser ``"l2"`` (``s`` is the
  two-class sparsemax ``clip((m / lambda + 1) / 2, 0, 1)``, which reaches exact 0/1) or ``"entropy"``
  (``s = sigmoid(m / lambda)``); a larger lambda gives softer steps. Step schemes: ``"fixed"`` (``a =
  fw_stepsize``) and ``"standard"`` (``a = 2 / (t + 2)``, t = 0, 1, ...). Exact line search is not offered: it
  costs one more filtering per step, and with border-normalised (row-normalised, hence non-symmetric) messages
  ``m`` is not exactly the gradient of an energy, so the "exact" step would be a heuristic too. With ``"l2"`` a
  pixel whose ``|m| > lambda`` at every step gets no gradient through the CRF (sparsemax saturates); the
  ``x0_weight`` term keeps a gradient to the network there, and the CRF's weights learn from the others.

The output mixes the CNN back in as the original did: ``p = x0_weight * sigmoid(u) + (1 - x0_weight) * x``,
returned as the logit of ``p`` (clamped to [1e-6, 1 - 1e-6]; mean field with ``x0_weight = 0`` returns ``m``
itself). With no pairwise kernel, mean field returns the unary unchanged; Frank-Wolfe returns the mix of
``sigmoid(u)`` with its regulariser's unary solution (``sigmoid(u / lambda)`` or the sparsemax above).

The CRF runs in float32 (float64 inputs stay float64) with autocast disabled, whatever the caller's precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .crf_filters import BilateralGrid, WindowKernel, gaussian_fft, window_geometry

SOLVERS = ("mf", "fw")
REGULARIZERS = ("l2", "entropy")
SCHEMES = ("fixed", "standard")
COMPATIBILITIES = ("potts", "class")
APPEARANCE_BACKENDS = ("auto", "window", "grid")
_EPS = 1e-6


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def _check_choice(name: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"CRF {name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_positive(name: str, value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"CRF {name} must be a positive number, got {value!r}")
    return float(value)


def standardize(guide: Tensor, eps: float = 1e-6) -> Tensor:
    """Zero mean, unit variance per image and channel (for scalar guides such as intensity or a logit)."""
    mean = guide.mean(dim=(-2, -1), keepdim=True)
    std = guide.std(dim=(-2, -1), keepdim=True)
    return (guide - mean) / (std + eps)


class DenseCRF(nn.Module):
    """Dense CRF on one logit channel (see the module docstring for the model, kernels and solvers).

    ``forward(logits [B,1,H,W], guide [B,C,H,W] or None) -> refined logits [B,1,H,W]``. The guide is needed when
    the appearance kernel is on (``bilateral_weight > 0``). Bandwidths are in pixels of the input (theta_alpha,
    theta_gamma) and guide units (theta_beta). Defaults are those of :class:`crisp_ext.config.CRFConfig`.
    """

    def __init__(self, *, solver: str = "fw", iterations: int = 5, theta_alpha: float = 4.0,
                 theta_beta: float = 1.0, theta_gamma: float = 3.0, spatial_weight: float = 4.0,
                 bilateral_weight: float = 1.0, compatibility: str = "class", fw_lambda: float = 1.0,
                 fw_stepsize: float = 1.0, fw_scheme: str = "fixed", fw_regularizer: str = "l2",
                 x0_weight: float = 0.25, learn_bandwidths: bool = False, appearance: str = "auto",
                 window_stride: int | None = None, grid_rho: float = 1.0):
        super().__init__()
        self.solver = _check_choice("solver", solver, SOLVERS)
        self.fw_regularizer = _check_choice("fw_regularizer", fw_regularizer, REGULARIZERS)
        self.fw_scheme = _check_choice("fw_scheme", fw_scheme, SCHEMES)
        self.compatibility = _check_choice("compatibility", compatibility, COMPATIBILITIES)
        self.appearance = _check_choice("appearance", appearance, APPEARANCE_BACKENDS)
        if int(iterations) != iterations or iterations < 0:
            raise ValueError(f"CRF iterations must be a non-negative integer, got {iterations!r}")
        self.iterations = int(iterations)
        self.fw_lambda = _check_positive("fw_lambda", fw_lambda)
        self.fw_stepsize = _check_positive("fw_stepsize", fw_stepsize)
        if not 0.0 <= x0_weight <= 1.0:
            raise ValueError(f"CRF x0_weight must be in [0, 1], got {x0_weight!r}")
        self.x0_weight = float(x0_weight)
        for name, w in (("spatial_weight", spatial_weight), ("bilateral_weight", bilateral_weight)):
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"CRF {name} must be >= 0 (0 turns the kernel off), got {w!r}")
        if learn_bandwidths and appearance == "grid" and bilateral_weight > 0:
            raise ValueError("CRF bandwidths cannot be learned with the 'grid' appearance backend; use 'window'")
        self.grid_rho = _check_positive("grid_rho", grid_rho)
        n = 2 if compatibility == "class" else 1
        self.spatial_raw = self._weight(spatial_weight, n)
        self.bilateral_raw = self._weight(bilateral_weight, n)
        self.learn_bandwidths = bool(learn_bandwidths)
        for name, theta in (("theta_alpha", theta_alpha), ("theta_beta", theta_beta), ("theta_gamma", theta_gamma)):
            value = torch.tensor(math.log(_check_positive(name, theta)))
            if learn_bandwidths:
                setattr(self, "log_" + name, nn.Parameter(value))
            else:
                self.register_buffer("log_" + name, value)
        # the window geometry is fixed at construction (a learned theta_alpha keeps these cells and this reach)
        self.window_stride, self.window_radius = window_geometry(theta_alpha, window_stride)

    @staticmethod
    def _weight(value: float, n: int) -> nn.Parameter | None:
        if value == 0:
            return None
        return nn.Parameter(torch.full((n,), _inv_softplus(float(value))))

    @classmethod
    def from_config(cls, cfg) -> DenseCRF:
        """Build from a :class:`crisp_ext.config.CRFConfig`."""
        return cls(solver=cfg.solver, iterations=cfg.iterations, theta_alpha=cfg.theta_alpha,
                   theta_beta=cfg.theta_beta, theta_gamma=cfg.theta_gamma, spatial_weight=cfg.spatial_weight,
                   bilateral_weight=cfg.bilateral_weight, compatibility=cfg.compatibility,
                   fw_lambda=cfg.fw_lambda, fw_stepsize=cfg.fw_stepsize, fw_scheme=cfg.fw_scheme,
                   fw_regularizer=cfg.fw_regularizer, x0_weight=cfg.x0_weight,
                   learn_bandwidths=cfg.learn_bandwidths, appearance=cfg.appearance,
                   window_stride=cfg.window_stride or None)

    @property
    def uses_guide(self) -> bool:
        return self.bilateral_raw is not None

    def kernel_weights(self) -> dict[str, Tensor]:
        """Current (w_fg, w_bg) per active kernel (Potts: both equal)."""
        out = {}
        for name, raw in (("spatial", self.spatial_raw), ("bilateral", self.bilateral_raw)):
            if raw is not None:
                out[name] = F.softplus(raw).expand(2)
        return out

    def bandwidths(self) -> dict[str, float]:
        return {name: float(getattr(self, "log_" + name).exp())
                for name in ("theta_alpha", "theta_beta", "theta_gamma")}

    def _use_grid(self, guide: Tensor) -> bool:
        if self.appearance != "auto":
            return self.appearance == "grid"
        return guide.shape[1] == 1 and not self.learn_bandwidths

    def _kernels(self, guide: Tensor | None, ref: Tensor):
        """[(message function, a, b)] with m = u + sum(a * F(x) + b)."""
        kernels = []
        if self.spatial_raw is not None:
            theta_g = self.log_theta_gamma.to(ref.dtype).exp()
            kernels.append((lambda x: gaussian_fft(x, theta_g), F.softplus(self.spatial_raw.to(ref.dtype))))
        if self.bilateral_raw is not None:
            ta = self.log_theta_alpha.to(ref.dtype).exp()
            tb = self.log_theta_beta.to(ref.dtype).exp()
            if self._use_grid(guide):
                kern = BilateralGrid(guide, float(ta), float(tb), rho=self.grid_rho)
            else:
                kern = WindowKernel(guide, ta, tb, self.window_stride, self.window_radius)
            kernels.append((kern.apply, F.softplus(self.bilateral_raw.to(ref.dtype))))
        out = []
        for fn, w in kernels:
            w_fg, w_bg = (w[0], w[-1])
            out.append((fn, w_fg + w_bg, -w_fg))
        return out

    def forward(self, logits: Tensor, guide: Tensor | None = None) -> Tensor:
        if logits.dim() != 4 or logits.shape[1] != 1:
            raise ValueError(f"CRF logits must have shape [B, 1, H, W], got {tuple(logits.shape)}")
        dtype = logits.dtype if logits.dtype == torch.float64 else torch.float32
        if self.uses_guide:
            if guide is None:
                raise ValueError("the CRF's appearance kernel needs a guide; pass one or set bilateral_weight = 0")
            if guide.dim() != 4 or guide.shape[0] != logits.shape[0] or guide.shape[-2:] != logits.shape[-2:]:
                raise ValueError(f"CRF guide must have shape [B, C, H, W] = [{logits.shape[0]}, C, "
                                 f"{logits.shape[2]}, {logits.shape[3]}], got {tuple(guide.shape)}")
            if self.appearance == "grid" and guide.shape[1] != 1:
                raise ValueError(f"the 'grid' appearance backend needs a 1-channel guide, got {guide.shape[1]}; "
                                 "use appearance='window' for feature guides")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            u = logits.to(dtype)
            g = guide.to(dtype) if (guide is not None and self.uses_guide) else None
            return self._solve(u, g)

    def _solve(self, u: Tensor, guide: Tensor | None) -> Tensor:
        kernels = self._kernels(guide, u)
        x0 = torch.sigmoid(u)
        x = x0
        m = u
        for t in range(self.iterations):
            m = u
            for fn, a, b in kernels:
                m = m + a * fn(x) + b
            if self.solver == "mf":
                x = torch.sigmoid(m)
                continue
            if self.fw_regularizer == "l2":
                s = ((m / self.fw_lambda + 1.0) * 0.5).clamp(0.0, 1.0)
            else:
                s = torch.sigmoid(m / self.fw_lambda)
            step = self.fw_stepsize if self.fw_scheme == "fixed" else 2.0 / (t + 2.0)
            x = x + step * (s - x)
        if self.solver == "mf" and self.x0_weight == 0.0:
            return m
        p = self.x0_weight * x0 + (1.0 - self.x0_weight) * x
        p = p.clamp(_EPS, 1.0 - _EPS)
        return torch.log(p) - torch.log1p(-p)

    def extra_repr(self) -> str:
        return (f"solver={self.solver}, iterations={self.iterations}, compatibility={self.compatibility}, "
                f"appearance={self.appearance if self.uses_guide else 'off'}, x0_weight={self.x0_weight}")


GUIDES = ("image", "logits", "features")


class CRFSegmenter(nn.Module):
    """An smp segmentation model (``classes=1``) followed by a :class:`DenseCRF`.

    ``guide``: ``"image"`` (the standard CRF: the input micrograph, standardised per image), ``"logits"`` (the
    original CD-CRF: the network's own logit, standardised) or ``"features"`` (the decoder's last feature map,
    projected to ``feature_channels`` by a learnable 1x1 convolution, upsampled to the logits' size, then
    standardised if one channel, else L2-normalised per pixel). With ``detach_guide`` (default) no gradient flows from the CRF into the network
    through the guide, only through the unary, as in the original; the projection still learns (it is part of
    the CRF). ``forward(image [B,1,H,W]) -> refined logits [B,1,H,W]``.
    """

    def __init__(self, model: nn.Module, crf: DenseCRF, guide: str = "logits", feature_channels: int = 1,
                 detach_guide: bool = True):
        super().__init__()
        self.model = model
        self.crf = crf
        self.guide = _check_choice("guide", guide, GUIDES)
        self.detach_guide = bool(detach_guide)
        self.project = None
        if guide == "features" and crf.uses_guide:
            for part in ("encoder", "decoder", "segmentation_head"):
                if not hasattr(model, part):
                    raise ValueError(f"guide='features' needs an smp model with .{part}; "
                                     f"got {type(model).__name__}")
            head = model.segmentation_head[0]
            if feature_channels < 1:
                raise ValueError(f"CRF feature_channels must be >= 1, got {feature_channels}")
            self.project = nn.Conv2d(head.in_channels, int(feature_channels), kernel_size=1)

    def network(self, image: Tensor) -> tuple[Tensor, Tensor | None]:
        """The network's logits [B,1,H,W] and, for the features guide, its decoder output (else None)."""
        if self.project is None:
            out = self.model(image)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            decoded = None
        else:
            if hasattr(self.model, "check_input_shape"):
                self.model.check_input_shape(image)
            decoded = self.model.decoder(self.model.encoder(image))
            logits = self.model.segmentation_head(decoded)
        if logits.shape[1] != 1:
            raise ValueError(f"the CRF needs a model with one output channel (classes=1), got {logits.shape[1]}")
        return logits, decoded

    def forward(self, image: Tensor) -> Tensor:
        logits, decoded = self.network(image)
        return self.refine(image, logits, decoded)

    def refine(self, image: Tensor, logits: Tensor, decoded: Tensor | None = None) -> Tensor:
        """Run the CRF on given network outputs (e.g. logits stitched from tiles): refined logits."""
        if not self.crf.uses_guide:
            return self.crf(logits)
        if self.guide == "image":
            guide = standardize(image.float())
        elif self.guide == "logits":
            guide = standardize((logits.detach() if self.detach_guide else logits).float())
        else:
            if decoded is None:
                raise ValueError("the features guide needs the decoder output; get it from network(image)")
            feats = decoded.detach() if self.detach_guide else decoded
            feats = self.project(feats.float())
            if feats.shape[-2:] != logits.shape[-2:]:
                feats = F.interpolate(feats, size=logits.shape[-2:], mode="bilinear", align_corners=False)
            guide = standardize(feats) if feats.shape[1] == 1 else F.normalize(feats, dim=1)
        return self.crf(logits, guide)

    def crf_parameters(self) -> Iterator[nn.Parameter]:
        """The CRF's weights and bandwidths, and the feature projection."""
        yield from self.crf.parameters()
        if self.project is not None:
            yield from self.project.parameters()

    def cnn_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def param_groups(self, lr_cnn: float, lr_crf: float) -> list[dict]:
        """Optimiser parameter groups with discriminative learning rates (empty groups left out)."""
        groups = [{"name": "cnn", "params": list(self.cnn_parameters()), "lr": float(lr_cnn)},
                  {"name": "crf", "params": list(self.crf_parameters()), "lr": float(lr_crf)}]
        return [g for g in groups if g["params"]]


CRF_KINDS = ("none", "standard", "cd")


def build_crf_segmenter(model: nn.Module, cfg) -> nn.Module:
    """Wrap ``model`` in a :class:`CRFSegmenter` as ``cfg`` (a :class:`crisp_ext.config.CRFConfig`) says; kind
    ``"none"`` returns ``model`` itself. ``standard`` guides by the micrograph, ``cd`` by ``cfg.cd_guide``."""
    kind = _check_choice("kind", cfg.kind, CRF_KINDS)
    if kind == "none":
        return model
    guide = "image" if kind == "standard" else _check_choice("cd_guide", cfg.cd_guide, ("logits", "features"))
    return CRFSegmenter(model, DenseCRF.from_config(cfg), guide=guide, feature_channels=cfg.feature_channels,
                        detach_guide=cfg.detach_guide)
