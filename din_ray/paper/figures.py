"""The paper's figures, drawn with matplotlib (Agg backend: files only, no display needed).

    curves.png       Fig. 4: test GAUC (and training loss) per epoch for each regularizer
    attention.png    Fig. 5: DIN's activation weight of each behaviour for two candidates
    embeddings.png   Fig. 6: a 2-D projection of item embeddings coloured by category

Each function takes plain numbers (no model, no data access) and writes one PNG atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from din_ray import io as atomic


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"),
                      suffix=path.suffix)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[list[dict]]], path: str | Path, title: str = "") -> Path:
    """Fig. 4: per regularizer, test GAUC and training loss against the epoch.

    Args:
        curves: label -> one per-epoch history per seed; each epoch a dict with `epoch`,
            `test_gauc` and `train_loss` (the `history` of `din_ray.train.loop.summarize`).
        path: PNG to write.
    Thin lines are single seeds, thick lines with markers their mean over the seeds that ran
    that epoch (early stopping can end seeds at different epochs).
    """
    fig, (ax_gauc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        for key, ax in (("test_gauc", ax_gauc), ("train_loss", ax_loss)):
            by_epoch: dict[int, list[float]] = {}
            for history in runs:
                xs = [h["epoch"] for h in history]
                ys = [h[key] for h in history]
                ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
                for x, y in zip(xs, ys):
                    by_epoch.setdefault(x, []).append(y)
            xs = sorted(by_epoch)
            ax.plot(xs, [float(np.mean(by_epoch[x])) for x in xs], color=colour, marker="o",
                    linewidth=2, label=label)
    ax_gauc.set(xlabel="epoch", ylabel="test GAUC", title="test GAUC per epoch")
    ax_loss.set(xlabel="epoch", ylabel="training log loss", title="training loss per epoch")
    for ax in (ax_gauc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_gauc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


@dataclass
class AttentionCase:
    """One user's history scored against two candidates (Fig. 5).

    behaviours: (L,) category name of each real behaviour, oldest first.
    candidates: the two candidates' (label, category name).
    weights: (2, L) activation weight of each behaviour for each candidate.
    """

    user: str
    behaviours: list[str]
    candidates: list[tuple[str, str]]
    weights: np.ndarray


def plot_attention(cases: list[AttentionCase], path: str | Path, title: str = "") -> Path:
    """Fig. 5: one panel per user; per behaviour, a bar per candidate with its activation
    weight. Behaviours sharing a candidate's category are marked under the axis, so whether
    the local activation picks out related behaviours can be read at a glance."""
    fig, axes = plt.subplots(len(cases), 1, figsize=(12, 3.2 * len(cases)), squeeze=False)
    colours = ("tab:blue", "tab:orange")
    for ax, case in zip(axes[:, 0], cases):
        n = len(case.behaviours)
        x = np.arange(n)
        for k, ((label, cate), colour) in enumerate(zip(case.candidates, colours)):
            ax.bar(x + (k - 0.5) * 0.4, case.weights[k, :n], width=0.4, color=colour,
                   label=f"candidate {label} ({cate})")
            match = [i for i, c in enumerate(case.behaviours) if c == cate]
            ax.scatter(match, np.full(len(match), 0.0), marker="^", color=colour, s=40,
                       zorder=3, clip_on=False, transform=ax.get_xaxis_transform())
        ax.set_xticks(x)
        ax.set_xticklabels(case.behaviours, rotation=75, fontsize=7)
        ax.set_ylabel("activation weight")
        ax.set_title(f"user {case.user}: behaviours (oldest first, labelled by category); "
                     "▲ = same category as the candidate", fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=8, loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_embeddings(xy: np.ndarray, categories: list[str], path: str | Path,
                    title: str = "") -> Path:
    """Fig. 6: 2-D points (N, 2), one per item, coloured by the item's category (N,)."""
    fig, ax = plt.subplots(figsize=(8, 7))
    names = sorted(set(categories), key=categories.index)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    cats = np.asarray(categories)
    for i, name in enumerate(names):
        sel = cats == name
        ax.scatter(xy[sel, 0], xy[sel, 1], s=12, color=cmap(i % cmap.N), label=name, alpha=0.8)
    ax.legend(fontsize=8, markerscale=1.5, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def project_2d(vectors: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, d) -> (N, 2) with t-SNE (scikit-learn, as the paper's Fig. 6) or PCA (numpy SVD)."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x - x.mean(0)
    if method == "tsne":
        from sklearn.manifold import TSNE  # optional dependency, imported only when used

        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca",
                    random_state=seed).fit_transform(x)
    if method != "pca":
        raise ValueError(f"projection must be 'tsne' or 'pca', got {method!r}")
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T
