"""Cost and accuracy of the dense CRF (crisp_ext.crf) at the working scale (particle diameter ≈ 24 px).

    python benchmarks/bench_crf.py                 # accuracy of the filters + CRF cost
    python benchmarks/bench_crf.py --tune          # also the synthetic parameter scan behind the defaults
    python benchmarks/bench_crf.py --threads 1 --device cuda

Sections:
1. appearance-kernel backends against the brute-force dense filter (64² synthetic scene, three guides);
2. smoothness kernel: FFT against separable convolution (cost), and their agreement with the dense filter;
3. cost of one appearance message per backend at 1024²;
4. CRF forward per micrograph (1024² and 910², batch 1, 5 iterations) for each solver and guide;
5. CRF forward + backward on a training batch (8 x 256²);
6. (--tune) IoU / specks / holes / bimodality on synthetic maps over theta and weights.
Synthetic inputs come from tests/crf_synthetic.py. Timings are wall-clock medians of 3 runs after a warm-up.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from crf_synthetic import iou, make_scene, uncertain_mass

from crisp_ext.crf import DenseCRF, standardize
from crisp_ext.crf_filters import (
    BilateralGrid,
    WindowKernel,
    dense_reference,
    gaussian_conv,
    gaussian_fft,
    window_geometry,
)


def timed(fn, device: torch.device, repeat: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def feature_guide(logits: torch.Tensor, channels: int = 4, seed: int = 0) -> torch.Tensor:
    """A smooth unit-vector guide that partly follows the logit, standing in for projected decoder features."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(logits.shape[0], channels, *logits.shape[-2:], generator=g, dtype=logits.dtype)
    noise = F.avg_pool2d(noise, 5, 1, 2).to(logits.device)
    return F.normalize(noise + 0.3 * logits, dim=1)


def big_logits(size: int, batch: int, device: torch.device) -> torch.Tensor:
    """Synthetic logits of ``size``² with particles of about 24 px (tiles of 128² scenes)."""
    tiles = [make_scene(size=128, n_particles=8, n_specks=10, n_holes=4, seed=s).logits for s in range(4)]
    block = torch.cat([torch.cat(tiles[:2], -1), torch.cat(tiles[2:], -1)], -2)  # 256²
    reps = -(-size // 256)
    full = block.repeat(batch, 1, reps, reps)[..., :size, :size]
    return full.contiguous().to(device)


def section_accuracy():
    print("\n## 1. Appearance kernel against the dense filter (64² scene; |message error| mean / max)")
    scene = make_scene(size=64, n_particles=4, n_specks=4, n_holes=2, seed=5)
    q = torch.sigmoid(scene.logits).double()
    guides = {"logit": standardize(scene.logits.double()), "image": standardize(scene.image.double()),
              "feat4": feature_guide(scene.logits.double())}
    print("| guide | θα | θβ | window, cells θα/2 (default) | window, stride 1 | grid ρ=1 (default) | grid ρ=1.5 |")
    print("|---|---|---|---|---|---|---|")
    for (name, g), ta, tb in itertools.product(guides.items(), (4.0, 8.0, 16.0), (0.25, 0.5, 1.0)):
        ref = dense_reference(q, g, ta, tb)

        def err(out):
            d = (out - ref).abs()
            return f"{float(d.mean()):.4f} / {float(d.max()):.3f}"

        cells = [err(WindowKernel(g, ta, tb, *window_geometry(ta)).apply(q)),
                 err(WindowKernel(g, ta, tb, *window_geometry(ta, stride=1)).apply(q))]
        if g.shape[1] == 1:
            cells += [err(BilateralGrid(g, ta, tb, rho=1.0).apply(q)),
                      err(BilateralGrid(g, ta, tb, rho=1.5).apply(q))]
        else:
            cells += ["scalar guides only", "-"]
        print(f"| {name} | {ta:g} | {tb:g} | " + " | ".join(cells) + " |")


def section_spatial(device: torch.device):
    print("\n## 2. Smoothness kernel: FFT vs separable convolution (max error vs dense on 48x56, cost)")
    q_small = torch.rand(1, 1, 48, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    big = torch.rand(1, 1, 1024, 1024, device=device)
    batch = torch.rand(8, 1, 256, 256, device=device)
    print("| σ | FFT err | conv err | FFT 1024² | conv 1024² | FFT 8x256² | conv 8x256² |")
    print("|---|---|---|---|---|---|---|")
    for sigma in (1.5, 3.0, 6.0):
        ref = dense_reference(q_small, None, sigma, None)
        e_fft = float((gaussian_fft(q_small, sigma) - ref).abs().max())
        e_conv = float((gaussian_conv(q_small, sigma) - ref).abs().max())
        t = [timed(lambda: gaussian_fft(x, sigma), device) for x in (big, batch)]
        c = [timed(lambda: gaussian_conv(x, sigma), device) for x in (big, batch)]
        print(f"| {sigma:g} | {e_fft:.1e} | {e_conv:.1e} | {t[0] * 1e3:.1f} ms | {c[0] * 1e3:.1f} ms | "
              f"{t[1] * 1e3:.1f} ms | {c[1] * 1e3:.1f} ms |")


def section_message_cost(device: torch.device):
    print("\n## 3. One appearance message at 1024², θβ=1 (built once per image; applied once per iteration)")
    logits = big_logits(1024, 1, device)
    q = torch.sigmoid(logits)
    scalar, vector = standardize(logits), feature_guide(logits)
    print("| backend | guide | θα | cells / radius | build | apply |")
    print("|---|---|---|---|---|---|")
    for ta in (4.0, 8.0):
        stride, radius = window_geometry(ta)
        cases = [("grid ρ=1", "scalar", lambda: BilateralGrid(scalar, ta, 1.0), "-"),
                 ("window", "scalar", lambda: WindowKernel(scalar, ta, 1.0, stride, radius), f"{stride} / {radius}"),
                 ("window", "4 channels", lambda: WindowKernel(vector, ta, 1.0, stride, radius),
                  f"{stride} / {radius}")]
        for name, guide, make, geo in cases:
            build = timed(make, device, repeat=1)
            kern = make()
            step = timed(lambda: kern.apply(q), device)
            print(f"| {name} | {guide} | {ta:g} | {geo} | {build * 1e3:.0f} ms | {step * 1e3:.0f} ms |")


def _crf_cases(logits: torch.Tensor):
    scalar, vector = standardize(logits), feature_guide(logits)
    for solver in ("mf", "fw"):
        yield solver, "spatial only", DenseCRF(solver=solver, bilateral_weight=0.0), None
        yield solver, "scalar (grid)", DenseCRF(solver=solver), scalar
        yield solver, "4-ch features (window)", DenseCRF(solver=solver), vector


def section_crf_forward(device: torch.device):
    print("\n## 4. CRF forward per micrograph (batch 1, 5 iterations, defaults θγ=3, θα=4, θβ=1)")
    print("| size | solver | appearance guide | forward |")
    print("|---|---|---|---|")
    for size in (1024, 910):
        logits = big_logits(size, 1, device)
        for solver, guide_name, crf, guide in _crf_cases(logits):
            crf = crf.to(device)
            with torch.no_grad():
                t = timed(lambda: crf(logits, guide), device)
            print(f"| {size}² | {solver} | {guide_name} | {t:.2f} s |")


def section_crf_train(device: torch.device):
    print("\n## 5. CRF forward + backward on a training batch (8 x 256², 5 iterations)")
    print("| solver | appearance guide | fwd+bwd |")
    print("|---|---|---|")
    base = big_logits(256, 8, device)
    for solver, guide_name, crf, guide in _crf_cases(base):
        crf = crf.to(device)
        logits = base.clone().requires_grad_(True)

        def step():
            crf.zero_grad()
            crf(logits, guide).sum().backward()

        print(f"| {solver} | {guide_name} | {timed(step, device):.2f} s |")


def section_tune():
    print("\n## 6. Synthetic scan (4 scenes of 128², D = 24 px, unary ±3 with noise, specks/holes at ±1.5)")
    print("columns: IoU at 0.5, mass in [0.1, 0.9], fraction of speck pixels still positive, of hole pixels "
          "still negative")
    scenes = [make_scene(size=128, n_particles=10, n_specks=12, n_holes=6, seed=s) for s in range(4)]

    def evaluate(crf, guide_kind):
        rows = []
        for sc in scenes:
            p = torch.sigmoid(sc.logits)
            if crf is not None:
                g = None if guide_kind is None else standardize(getattr(sc, guide_kind))
                with torch.no_grad():
                    p = torch.sigmoid(crf(sc.logits, g))
            pred = p.squeeze().numpy() > 0.5
            rows.append((iou(p, sc.mask), uncertain_mass(p), pred[sc.specks].mean(), (~pred[sc.holes]).mean()))
        return " ".join(f"{v:.3f}" for v in np.mean(rows, 0))

    print(f"unary alone: {evaluate(None, None)}")
    print("\nsmoothness kernel only (x0_weight 0.25):")
    for solver, tg, w in itertools.product(("mf", "fw"), (1.5, 2.0, 3.0, 4.0, 6.0), (1.0, 2.0, 4.0, 6.0)):
        crf = DenseCRF(solver=solver, theta_gamma=tg, spatial_weight=w, bilateral_weight=0.0)
        print(f"  {solver} θγ={tg:g} w={w:g}: {evaluate(crf, None)}")
    print("\nx0_weight (fw, θγ=3, w=4, spatial only):")
    for x0 in (0.0, 0.25, 0.5):
        crf = DenseCRF(theta_gamma=3.0, spatial_weight=4.0, bilateral_weight=0.0, x0_weight=x0)
        print(f"  x0_weight={x0:g}: {evaluate(crf, None)}")
    print("\nadding the appearance kernel (fw, θγ=3, w=4):")
    for guide, ta, tb, wb in itertools.product(("logits", "image"), (4.0, 8.0, 16.0), (0.25, 0.5, 1.0), (0.5, 1.0, 2.0)):
        crf = DenseCRF(theta_alpha=ta, theta_beta=tb, bilateral_weight=wb)
        print(f"  {guide} θα={ta:g} θβ={tb:g} wb={wb:g}: {evaluate(crf, guide)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tune", action="store_true", help="also run the synthetic parameter scan (slow)")
    parser.add_argument("--skip-cost", action="store_true", help="only the accuracy (and --tune) sections")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# CRF benchmark: torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads")
    section_accuracy()
    if not args.skip_cost:
        section_spatial(device)
        section_message_cost(device)
        section_crf_forward(device)
        section_crf_train(device)
    if args.tune:
        section_tune()


if __name__ == "__main__":
    main()
