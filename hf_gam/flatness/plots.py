"""Pictures of the flatness diagnostics of :mod:`hf_gam.flatness` (PNG files).

matplotlib is imported inside the functions that draw, so ``import hf_gam`` does not load it.

Drawn with matplotlib's object-oriented API on an Agg canvas (``matplotlib.figure.Figure``, never ``pyplot``): no
global backend is switched, no window opens, and it works headless and from several threads. Every function takes
``{label: result}`` so that one model or several (e.g. ``{"SGD": ..., "GAM": ...}``) are drawn side by side on
shared scales, and returns the path it wrote.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["plot_spectrum", "plot_landscape", "plot_landscape_1d"]

_COLORS = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown"]


def _figure(**kwargs):
    """A new ``matplotlib.figure.Figure`` on an Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from ..atomic import atomic_save

    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    return str(path)


def _require_models(results: Mapping[str, Any]) -> None:
    if not results:
        raise ValueError("results must name at least one model; got an empty mapping")


def plot_spectrum(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                  title: str | None = None) -> str:
    """The paper's Figure 3: left, the histogram of the top Hessian eigenvalues of every model on shared bins (a
    dashed line at each model's λmax); right, the Hessian trace of every model (with its standard error when the
    result has ``hessian_trace_stderr``). ``results[label]`` needs ``hessian_eigenvalues`` and ``hessian_trace``."""
    _require_models(results)
    fig = _figure(figsize=(10, 4), layout="constrained")
    ax_hist, ax_trace = fig.subplots(1, 2, width_ratios=[2.2, 1])
    every = np.concatenate([np.asarray(r["hessian_eigenvalues"], dtype=float) for r in results.values()])
    lo, hi = float(every.min()), float(every.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1e-12) * 0.05
    bins = np.linspace(lo - pad, hi + pad, max(10, min(40, 2 * len(every) // len(results))))
    for i, (label, r) in enumerate(results.items()):
        eig = np.asarray(r["hessian_eigenvalues"], dtype=float)
        color = _COLORS[i % len(_COLORS)]
        ax_hist.hist(eig, bins=bins, alpha=0.55, color=color, edgecolor="black", linewidth=0.5,
                     label=f"{label}: λmax = {eig.max():.4g} (top {len(eig)})")
        ax_hist.axvline(eig.max(), color=color, linestyle="--", linewidth=1.2)
    ax_hist.set_xlabel("Hessian eigenvalue")
    ax_hist.set_ylabel("count")
    ax_hist.set_title("Top Hessian eigenvalues")
    ax_hist.legend(fontsize=8, loc="best")
    labels = list(results)
    traces = [float(results[k]["hessian_trace"]) for k in labels]
    errs = [float(results[k].get("hessian_trace_stderr") or 0.0) for k in labels]
    errs = [e if math.isfinite(e) else 0.0 for e in errs]
    bars = ax_trace.bar(labels, traces, yerr=errs, capsize=4,
                        color=[_COLORS[i % len(_COLORS)] for i in range(len(labels))], alpha=0.8)
    ax_trace.bar_label(bars, labels=[f"{t:.4g}" for t in traces], fontsize=8, padding=2)
    ax_trace.set_title("Hessian trace (Hutchinson)")
    ax_trace.set_ylabel("tr(H)")
    ax_trace.margins(y=0.15)
    fig.suptitle(title or "Hessian spectrum")
    return _save(fig, path)


def plot_landscape(landscapes: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                   title: str | None = None) -> str:
    """The paper's Figure 5: the 2-D loss surface of every model (a result of
    :func:`hf_gam.flatness.loss_landscape` with ``dim=2``), as 3-D surfaces side by side on a shared loss scale,
    each with its contour lines below."""
    from matplotlib.ticker import MaxNLocator

    _require_models(landscapes)
    n = len(landscapes)
    fig = _figure(figsize=(5.2 * n, 4.6), layout="constrained")
    zs = {k: np.asarray(v["losses"], dtype=float) for k, v in landscapes.items()}
    finite = np.concatenate([z[np.isfinite(z)] for z in zs.values()])
    zmin, zmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    zmax = zmax if zmax > zmin else zmin + 1.0
    for i, (label, land) in enumerate(landscapes.items()):
        if land.get("dim") != 2:
            raise ValueError(f"landscape {label!r} must be 2-D (dim=2); got dim={land.get('dim')!r}")
        ax = fig.add_subplot(1, n, i + 1, projection="3d")
        c = np.asarray(land["coords"], dtype=float)
        a, b = np.meshgrid(c, c)  # losses are indexed [b][a]
        z = np.clip(zs[label], zmin, zmax)
        ax.plot_surface(a, b, z, cmap="viridis", vmin=zmin, vmax=zmax, linewidth=0, antialiased=True, alpha=0.9)
        ax.contour(a, b, z, zdir="z", offset=zmin, levels=12, cmap="viridis", vmin=zmin, vmax=zmax)
        ax.scatter([0.0], [0.0], [land["center_loss"]], color="red", s=25, depthshade=False, label="θ")
        ax.set_zlim(zmin, zmax)
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_zlabel("loss")
        ax.set_title(f"{label}\nloss at θ (red dot) {land['center_loss']:.4g}", fontsize=10)
    fig.suptitle(title or "Loss landscape (filter-normalized random directions)")
    return _save(fig, path)


def plot_landscape_1d(landscapes: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                      title: str | None = None) -> str:
    """The 1-D loss curves of every model (results of :func:`hf_gam.flatness.loss_landscape` with ``dim=1``)
    on one axes."""
    _require_models(landscapes)
    fig = _figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (label, land) in enumerate(landscapes.items()):
        if land.get("dim") != 1:
            raise ValueError(f"landscape {label!r} must be 1-D (dim=1); got dim={land.get('dim')!r}")
        ax.plot(land["coords"], land["losses"], marker="o", markersize=3, color=_COLORS[i % len(_COLORS)],
                label=label)
    ax.axvline(0.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("step along a filter-normalized random direction")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Loss along a random direction")
    return _save(fig, path)
