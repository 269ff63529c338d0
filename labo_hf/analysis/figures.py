"""Inspect the training targets of one prediction position: one-hot, label smoothing and LABO.

    from labo_hf.analysis.figures import target_distributions, plot_target_distributions
    d = target_distributions(logits[t], labels[t], alpha=0.1, temperature=2.0, top_k=10)
    fig = plot_target_distributions(d, token_names=tokenizer.convert_ids_to_tokens(d["indices"]))

matplotlib is imported only by `plot_target_distributions`, so this module is importable without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from labo_hf.loss.config import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, resolve_hyperparameters
from labo_hf.loss.functional import labo_target

__all__ = ["plot_target_distributions", "target_distributions"]


def target_distributions(
    logits: Tensor,
    label: int | Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int = 10,
) -> dict[str, Any]:
    """Targets q = (1 - alpha) e_y + alpha u of the three regularizers at one position.

    Args:
        logits: (K,) logits of one position (any float dtype; treated as constants).
        label: the gold class y in [0, K).
        alpha: smoothing mass shared by label smoothing and LABO.
        temperature: LABO's temperature T.
        top_k: number of classes returned: the label plus the top_k - 1 non-target classes the
            model ranks highest (the classes where LABO puts most of its mass).

    Returns:
        dict with
        ``indices`` (list[int], label first, then non-target classes by decreasing model probability),
        ``model`` (the model's softmax p), ``one_hot``, ``label_smoothing``, ``labo`` (each a
        list[float] aligned with ``indices``), ``rest`` (dict: the mass each distribution puts on
        the K - top_k classes not shown), and ``label``, ``alpha``, ``temperature``, ``num_classes``.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 1:
        raise ValueError(f"logits must be a 1-D tensor (K,) for one position, got {getattr(logits, 'shape', logits)}")
    num_classes = logits.shape[0]
    y = int(label)
    if not 0 <= y < num_classes:
        raise ValueError(f"label must be in [0, {num_classes}), got {y}")
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k must be in [1, {num_classes}], got {top_k}")
    alpha, _ = resolve_hyperparameters("label_smoothing", alpha, None)
    _, temperature = resolve_hyperparameters("labo", alpha, temperature)

    z = logits.detach().float().cpu()
    p = torch.softmax(z, dim=-1)
    one_hot = torch.zeros(num_classes)
    one_hot[y] = 1.0
    ls = (1 - alpha) * one_hot + alpha / num_classes
    u = labo_target(z.unsqueeze(0), torch.tensor([y]), temperature=temperature)[0]
    # A row with no finite non-target logit has u = 0: the loss then trains towards e_y (see losses).
    a_eff = alpha if float(u.sum()) > 0 else 0.0
    labo = (1 - a_eff) * one_hot + a_eff * u

    others = p.clone()
    others[y] = -math.inf
    top_others = torch.topk(others, k=top_k - 1).indices.tolist() if top_k > 1 else []
    indices = [y] + top_others
    idx = torch.tensor(indices)

    def shown(dist: Tensor) -> list[float]:
        return dist[idx].tolist()

    def rest(dist: Tensor) -> float:
        return float(dist.sum() - dist[idx].sum())

    return {
        "indices": indices,
        "label": y,
        "alpha": alpha,
        "temperature": temperature,
        "num_classes": num_classes,
        "model": shown(p),
        "one_hot": shown(one_hot),
        "label_smoothing": shown(ls),
        "labo": shown(labo),
        "rest": {"model": rest(p), "one_hot": rest(one_hot), "label_smoothing": rest(ls), "labo": rest(labo)},
    }


def plot_target_distributions(
    dist: dict[str, Any],
    *,
    token_names: Sequence[str] | None = None,
    title: str | None = None,
    show_model: bool = True,
    path: str | None = None,
):
    """Bar chart of the targets from `target_distributions` (like Fig. 1 of the LABO paper).

    Two panels: all shown classes on a linear scale, and the non-target classes only on a log
    scale, because the smoothing mass (alpha / K per class for label smoothing) is invisible next
    to the label's 1 - alpha. Returns the matplotlib Figure; saves it when ``path`` is given.
    """
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "png"):
        # Saving to a file must work on machines without a display.
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(token_names) if token_names is not None else [str(i) for i in dist["indices"]]
    if len(names) != len(dist["indices"]):
        raise ValueError(f"token_names has {len(names)} entries, expected {len(dist['indices'])}")
    series = [("one-hot (CE)", "one_hot", "#999999"),
              (f"label smoothing (α={dist['alpha']:g})", "label_smoothing", "#1f77b4"),
              (f"LABO (α={dist['alpha']:g}, T={dist['temperature']:g})", "labo", "#d62728")]
    if show_model:
        series.append(("model p (current)", "model", "#2ca02c"))
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 2]})
    for ax, start, subtitle in ((axes[0], 0, "all shown classes"),
                                (axes[1], 1, "non-target classes (log scale)")):
        xs = range(len(names) - start)
        for i, (label, key, color) in enumerate(series):
            vals = dist[key][start:]
            ax.bar([x + (i - (len(series) - 1) / 2) * width for x in xs], vals, width, label=label, color=color)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names[start:], rotation=45, ha="right")
        ax.set_title(subtitle)
        ax.set_ylabel("target probability")
        if start == 1:
            positive = [v for _, key, _ in series for v in dist[key][1:] if v > 0]
            if positive:
                ax.set_yscale("log")
                ax.set_ylim(min(positive) / 3, 1.0)
    axes[1].legend(fontsize=8)
    rest = dist["rest"]
    fig.text(0.01, 0.01, f"mass on the other {dist['num_classes'] - len(names)} classes: "
             f"LS {rest['label_smoothing']:.3f}, LABO {rest['labo']:.3f}, model {rest['model']:.3f}",
             fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig
