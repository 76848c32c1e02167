"""Grouped cross-validation for ``probe_position``: out-of-fold probe fits of every layer at once.

A ``FoldPlan`` says which rows (tokens or token pairs) train and test each fit: whole sequences
per fold, with and without position 0. The fitters return pooled out-of-fold predictions
[L V n T] for L layers, V position-0 variants, n rows and T target columns (the target and its
shuffled-label controls), so a layer's score, its controls and both variants come from one pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from posprobe.distributed import Ranks
from posprobe.stats.probe_estimators import (
    block_stats,
    correlation_scores,
    fit_logistic,
    scale_of,
    solve_ridge,
    top_k,
)


@dataclass
class FoldPlan:
    """Grouped cross-validation with variants: which rows train and test each fit.

    Rows fall into blocks ``fold * 2 + at_pos0``. Fit ``i`` is (variant ``fits[i][0]``, fold
    ``fits[i][1]``); variant ``with_pos0=False`` drops position-0 rows from training and testing.
    """

    block: Tensor  # [n]
    n_folds: int
    with_pos0: tuple[bool, ...]
    fits: list[tuple[int, int, Tensor]]  # (variant, fold, test rows)
    train_blocks: Tensor  # [n_fits 2F] bool
    full_train: Tensor  # [n_variants 2F] bool: every row a variant uses

    @classmethod
    def build(cls, fold: Tensor, at_pos0: Tensor, n_folds: int, with_pos0: tuple[bool, ...]) -> FoldPlan:
        block = fold * 2 + at_pos0.long()
        b_fold = torch.arange(2 * n_folds) // 2
        b_pos0 = torch.arange(2 * n_folds) % 2 == 1
        fits, train_blocks, full_train = [], [], []
        for v, keep0 in enumerate(with_pos0):
            allowed = torch.ones_like(b_pos0) if keep0 else ~b_pos0
            full_train.append(allowed)
            for f in range(n_folds):
                rows = ((fold == f) & (keep0 | ~at_pos0)).nonzero().squeeze(1)
                fits.append((v, f, rows))
                train_blocks.append(allowed & (b_fold != f))
        return cls(block, n_folds, with_pos0, fits, torch.stack(train_blocks), torch.stack(full_train))

    @property
    def n_blocks(self) -> int:
        return 2 * self.n_folds

    def empty_predictions(self, L: int, T: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.full((L, len(self.with_pos0), self.block.numel(), T), float("nan"), dtype=dtype, device=device)


def index_in(chosen: Tensor, n: int) -> Tensor:
    """[n]: where each of ``n`` indices stands in ``chosen`` (distinct indices below n), -1 where it is not chosen."""
    where = torch.full((n,), -1, dtype=torch.long)
    where[chosen] = torch.arange(chosen.numel())
    return where


@dataclass(frozen=True)
class RowShare:
    """The rows of ``X`` this process holds when the ranks of a distributed run hold the rest (each its
    own sequences): ``local`` [n_local] their indices among all n rows, ascending. Sums over rows are
    all-reduced; predictions are made where the rows are and summed into every rank's [L V n T]."""

    local: Tensor
    ranks: Ranks
    where: Tensor  # [n] each row's index in X, -1 where another rank holds it

    @classmethod
    def build(cls, local: Tensor, n: int, ranks: Ranks) -> RowShare:
        return cls(local, ranks, index_in(local, n))

    def reduce(self, tensors: Iterable[Tensor]) -> None:
        self.ranks.all_reduce(tensors)

    def held(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Of ``rows`` (indices among all rows), those held here: their indices among all rows and in ``X``."""
        here = self.where.to(rows.device)[rows]
        return rows[here >= 0], here[here >= 0]

    def combine(self, pred: Tensor, plan: FoldPlan) -> Tensor:
        """Every rank's predictions of its own rows (0 elsewhere) summed, NaN where no fit predicts a row."""
        self.reduce([pred])
        predicted = torch.zeros(len(plan.with_pos0), plan.block.numel(), dtype=torch.bool, device=pred.device)
        for v, _, rows in plan.fits:
            predicted[v, rows.to(pred.device)] = True
        return pred.masked_fill_(~predicted[None, :, :, None], float("nan"))


def _rows_of(plan: FoldPlan, Y: Tensor, share: RowShare | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each held row's block and targets: every row's, or with ``share`` those of the rows held here."""
    block, Y = plan.block.to(device), Y.to(device)
    if share is None:
        return block, Y
    local = share.local.to(device)
    return block[local], Y[local]


def _fit_rows(plan: FoldPlan, share: RowShare | None, device: torch.device) -> list[tuple[int, Tensor, Tensor]]:
    """Per fit: (variant, its test rows held here among all rows, the same rows in ``X``)."""
    out = []
    for v, _, rows in plan.fits:
        rows = rows.to(device)
        out.append((v, *share.held(rows)) if share is not None else (v, rows, rows))
    return out


def _predictions(
    plan: FoldPlan, L: int, T: int, dtype: torch.dtype, device: torch.device, share: RowShare | None
) -> Tensor:
    """The prediction tensor [L V n T]: NaN until predicted; with ``share`` 0, as the ranks' parts are summed."""
    if share is None:
        return plan.empty_predictions(L, T, dtype, device)
    return torch.zeros(L, len(plan.with_pos0), plan.block.numel(), T, dtype=dtype, device=device)


def ridge_oof(
    X: Tensor,
    Y: Tensor,
    plan: FoldPlan,
    alphas: Sequence[float],
    selection: str,
    dtype: torch.dtype,
    share: RowShare | None = None,
) -> tuple[Tensor, Tensor]:
    """Out-of-fold ridge predictions [L V n T] for ``X`` [L n d], ``Y`` [n T], and alphas [L n_fits T].

    Layers are solved in chunks whose per-block Gram matrices [l blocks d d] stay under
    ``GRAM_BUDGET_BYTES`` (every layer is an independent problem, so chunking changes no number):
    30 layers × 10 blocks × 576² in float64 would otherwise hold 0.8 GB, twice (Grams, eigenvectors).
    ``share``: ``X`` holds only this rank's rows; the Gram matrices, cross-products and leave-one-out
    errors are all-reduced, every rank solves the same problems and predicts its own rows.
    """
    block, Y_rows = _rows_of(plan, Y, share, X.device)
    reduce = None if share is None else share.reduce
    L, _, d = X.shape
    per_layer = plan.n_blocks * d * d * torch.finfo(dtype).bits // 8
    step = max(1, GRAM_BUDGET_BYTES // max(1, per_layer))
    train_blocks = plan.train_blocks.to(X.device)
    fit_rows = _fit_rows(plan, share, X.device)
    pred = _predictions(plan, L, Y.shape[1], dtype, X.device, share)
    alpha = []
    for lo in range(0, L, step):
        Xl = X[lo : lo + step]
        stats = block_stats(Xl, Y_rows, block, plan.n_blocks, dtype, reduce=reduce)
        sol = solve_ridge(stats, train_blocks, alphas, selection, (Xl, Y_rows, block), reduce)
        del stats
        for i, (v, rows, here) in enumerate(fit_rows):
            pred[lo : lo + step, v, rows] = sol.predict(Xl[:, here], i)
        alpha.append(sol.alpha)
    return (pred if share is None else share.combine(pred, plan)), torch.cat(alpha)


#: The most memory the per-block Gram matrices of one chunk of layers may take in ``ridge_oof``.
GRAM_BUDGET_BYTES = 256 * 2**20


def sparse_oof(
    X: Tensor,
    Y: Tensor,
    plan: FoldPlan,
    k: int,
    alphas: Sequence[float],
    selection: str,
    dtype: torch.dtype,
    share: RowShare | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Out-of-fold k-sparse predictions [L V n T]; alphas [L n_fits T]; neurons [L V k] chosen on all rows.

    Neurons are re-selected on every training fold and for every target column (so the
    shuffled-label control selects its own neurons); the reported ``neurons`` come from all the
    rows a variant uses, for target column 0. ``share``: as ``ridge_oof`` (the correlations too are sums).
    """
    L, n, d = X.shape
    if not 1 <= k <= d:
        raise ValueError(f"k must be in 1..{d} (the number of features), got {k}")
    block, Y_rows = _rows_of(plan, Y, share, X.device)
    reduce = None if share is None else share.reduce
    diag = block_stats(X, Y_rows, block, plan.n_blocks, dtype, full=False, reduce=reduce)
    scores = correlation_scores(diag, plan.train_blocks.to(X.device))  # [L F d T]
    neurons = top_k(correlation_scores(diag, plan.full_train.to(X.device))[..., 0], k)
    pred = _predictions(plan, L, Y.shape[1], dtype, X.device, share)
    alpha = torch.zeros(L, len(plan.fits), Y.shape[1], dtype=dtype, device=X.device)
    for i, (v, rows, here) in enumerate(_fit_rows(plan, share, X.device)):
        for t in range(Y.shape[1]):
            sel = top_k(scores[:, i, :, t], k)  # [L k]
            Xs = X.gather(2, sel[:, None, :].expand(L, n, k))
            stats = block_stats(Xs, Y_rows[:, t : t + 1], block, plan.n_blocks, dtype, reduce=reduce)
            data = (Xs, Y_rows[:, t : t + 1], block)
            sol = solve_ridge(stats, plan.train_blocks[i : i + 1].to(X.device), alphas, selection, data, reduce)
            pred[:, v, rows, t] = sol.predict(Xs[:, here], 0)[..., 0]
            alpha[:, i, t] = sol.alpha[:, 0, 0]
    return (pred if share is None else share.combine(pred, plan)), alpha, neurons


def logistic_oof(
    X: Tensor, Y: Tensor, plan: FoldPlan, C: float, max_iter: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Out-of-fold multinomial predictions [L V n T] (the predicted class's target value); C as [L n_fits T]."""
    L = X.shape[0]
    block = plan.block.to(X.device)
    # the control columns permute the same values, so one class list serves every column
    classes, y_idx = torch.unique(Y.to(X.device), return_inverse=True)
    pred = plan.empty_predictions(L, Y.shape[1], dtype, X.device)
    for i, (v, _, rows) in enumerate(plan.fits):
        rows = rows.to(X.device)
        train = plan.train_blocks[i].to(X.device)[block].nonzero().squeeze(1)
        Xtr = X[:, train].to(dtype)
        mean = Xtr.mean(1, keepdim=True)
        scale = scale_of(Xtr.var(1, unbiased=False))[:, None, :]
        Ztr, Zte = (Xtr - mean) / scale, (X[:, rows].to(dtype) - mean) / scale
        W, b = fit_logistic(Ztr, y_idx[train], len(classes), C, max_iter, 1e-6)
        pred[:, v, rows] = classes.to(dtype)[torch.einsum("lnd,ldtk->lntk", Zte, W).add(b[:, None]).argmax(-1)]
    return pred, torch.full((L, len(plan.fits), Y.shape[1]), C, dtype=dtype, device=X.device)


def token_baseline_oof(key: Tensor, y: Tensor, plan: FoldPlan, alphas: Sequence[float]) -> Tensor:
    """Out-of-fold predictions [V n] from token identity alone: ridge on one-hot token ids.

    The fit is the shrunken per-token mean ``ybar + sum(y - ybar) / (n_token + alpha)`` (ridge
    on one-hot ids with an unpenalised mean); alpha is chosen by exact leave-one-out, which is
    cheap here because the hat matrix is diagonal per token: h = 1 / (n_token + alpha).
    Unseen tokens get ``ybar``.
    """
    _, key = torch.unique(key, return_inverse=True)
    n_keys = int(key.max()) + 1
    grid = torch.as_tensor(list(alphas), dtype=torch.float64)
    y = y.double().cpu()
    pred = torch.full((len(plan.with_pos0), y.numel()), float("nan"), dtype=torch.float64)
    for i, (v, _, rows) in enumerate(plan.fits):
        train = plan.train_blocks[i][plan.block].nonzero().squeeze(1)
        ybar = y[train].mean()
        counts = torch.bincount(key[train], minlength=n_keys).double()
        sums = torch.bincount(key[train], weights=y[train] - ybar, minlength=n_keys)
        c, s, r = counts[key[train]], sums[key[train]], y[train] - ybar
        den = c[:, None] + grid  # [n_train A]
        loo = (r[:, None] - s[:, None] / den) / (1 - 1 / den)
        alpha = grid[(loo**2).mean(0).argmin()]
        pred[v, rows] = ybar + sums[key[rows]] / (counts[key[rows]] + alpha)
    return pred
