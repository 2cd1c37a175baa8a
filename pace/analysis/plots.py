"""PNG figures of the analysis: membership grids, per-layer coefficients and rates, token spectra.

The figures are built on ``matplotlib.figure.Figure`` and written by the Agg canvas directly, never through
``pyplot``: no backend is chosen, no global figure state is touched, and nothing happens at import, so the
functions are safe in a training process, a headless job or a notebook alike.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import Tensor


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def head_colors(num_heads: int) -> np.ndarray:
    """A distinct RGB colour per head (tab10, then tab20, then hsv for many heads).

    Args:
        num_heads: K.

    Returns:
        (K, 3) floats in [0, 1].
    """
    from matplotlib import colormaps

    name = "tab10" if num_heads <= 10 else "tab20" if num_heads <= 20 else "hsv"
    cmap = colormaps[name]
    if name == "hsv":
        return np.asarray([cmap(k / num_heads)[:3] for k in range(num_heads)])
    return np.asarray([cmap(k)[:3] for k in range(num_heads)])


def plot_membership_grid(
    image: np.ndarray,
    maps: Mapping[int, Tensor],
    path: str | Path,
    *,
    title: str | None = None,
    overlay_alpha: float = 0.55,
    dpi: int = 100,
) -> Path:
    """The image, then one row per block: the argmax-head segmentation over the image and each head's π map.

    Args:
        image: What the model saw, (H, W, 3) uint8.
        maps: Block index → π maps (K, H, W) of this image (the image's size).
        path: PNG to write.
        title: Figure title.
        overlay_alpha: Opacity of the segmentation colours over the image.
        dpi: Resolution.

    Returns:
        ``path``.
    """
    if not maps:
        raise ValueError("plot_membership_grid needs the maps of at least one block")
    blocks = sorted(maps)
    num_heads = maps[blocks[0]].shape[0]
    colors = head_colors(num_heads)
    rows, cols = len(blocks), num_heads + 2
    fig = _figure(1.9 * cols + 0.6, 1.9 * rows + (0.5 if title else 0.2))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.0] * cols + [0.06])
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(image)
    ax.set_title("input", fontsize=9)
    ax.set_axis_off()
    heat = None
    for r, block in enumerate(blocks):
        pi = maps[block].detach().float().cpu().numpy()  # (K, H, W)
        seg = pi.argmax(0)  # (H, W)
        blend = (1 - overlay_alpha) * image.astype(np.float32) / 255 + overlay_alpha * colors[seg]
        ax = fig.add_subplot(grid[r, 1])
        ax.imshow(blend.clip(0, 1))
        ax.set_axis_off()
        ax.set_title(f"block {block}: argmax head", fontsize=8)
        for k in range(num_heads):
            ax = fig.add_subplot(grid[r, k + 2])
            heat = ax.imshow(pi[k], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colors[k])
                spine.set_linewidth(3)
            ax.set_title(f"head {k} π (mean {pi[k].mean():.2f})", fontsize=8)
    fig.colorbar(heat, cax=fig.add_subplot(grid[:, cols]), label="membership π")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_coefficients(coefficients: Sequence[Mapping[str, float]], path: str | Path, *, dpi: int = 120) -> Path:
    """α and β per block (left) and τ per block (right).

    Args:
        coefficients: One ``{"alpha", "beta", "tau"}`` per block.
        path: PNG to write.
        dpi: Resolution.

    Returns:
        ``path``.
    """
    blocks = np.arange(len(coefficients))
    fig = _figure(9, 3.4)
    left, right = fig.subplots(1, 2)
    for name, label in [("alpha", "α (expansion step)"), ("beta", "β (compression step)")]:
        left.plot(blocks, [c[name] for c in coefficients], "o-", label=label)
    left.axhline(0, color="grey", lw=0.6)
    left.set_xlabel("block")
    left.set_title("step sizes per block", fontsize=10)
    left.legend(fontsize=8)
    right.plot(blocks, [c["tau"] for c in coefficients], "s-", color="tab:green")
    right.set_xlabel("block")
    right.set_title("membership temperature τ per block", fontsize=10)
    for ax in (left, right):
        ax.set_xticks(blocks)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_rates(rates: Mapping[str, Sequence[float]], path: str | Path, *, eps: float, dpi: int = 120) -> Path:
    """R and R_c per block (left) and ΔR = R − R_c per block (right), with ±1 std over images.

    Args:
        rates: ``{"block", "R", "Rc", "dR"}`` lists plus ``"R_std"``, ``"Rc_std"``, ``"dR_std"``.
        path: PNG to write.
        eps: Coding precision the rates were computed with (for the title).
        dpi: Resolution.

    Returns:
        ``path``.
    """
    blocks = np.asarray(rates["block"])
    fig = _figure(9, 3.4)
    left, right = fig.subplots(1, 2)
    for key, label in [("R", "R(Z)"), ("Rc", "R_c(Z | U)")]:
        left.errorbar(blocks, rates[key], yerr=rates[f"{key}_std"], fmt="o-", capsize=2, label=label)
    left.set_title(f"coding rates of the tokens after each block (ε = {eps:g})", fontsize=10)
    left.legend(fontsize=8)
    right.errorbar(blocks, rates["dR"], yerr=rates["dR_std"], fmt="o-", capsize=2, color="tab:red")
    right.axhline(0, color="grey", lw=0.6)
    right.set_title("rate reduction ΔR = R − R_c", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("block")
        ax.set_xticks(blocks)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_spectra(spectra: Mapping[int, Sequence[float]], path: str | Path, *, dpi: int = 120) -> Path:
    """Eigenvalues of the token covariance at chosen blocks, each divided by its largest (log scale).

    Args:
        spectra: Block index → eigenvalues, largest first.
        path: PNG to write.
        dpi: Resolution.

    Returns:
        ``path``.
    """
    fig = _figure(5.5, 3.8)
    ax = fig.subplots()
    for block in sorted(spectra):
        eig = np.asarray(spectra[block], dtype=np.float64)
        top = eig[0] if eig.size and eig[0] > 0 else 1.0
        ax.semilogy(np.arange(1, eig.size + 1), np.maximum(eig / top, 1e-12), label=f"block {block}")
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue / largest")
    ax.set_title("token covariance spectrum", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi)
