"""Linear position probes with scikit-learn's API, and the batched ridge kernel behind ``probe_position``.

Probes read a token's position from its activation (Haviv et al. 2022, "Transformer LMs
without positional encodings still learn positional information"); low-capacity linear probes
are preferred because they are selective (Hewitt & Liang 2019). Every probe standardises its
features inside ``fit`` (mean 0, population std 1 on the training rows; constant features are
left unscaled, as scikit-learn's ``StandardScaler`` does), so ``alpha`` / ``C`` mean the same at
every layer whatever the activation scale. ``coef_`` and ``intercept_`` are in the raw feature
units: ``predict(X) = X @ coef_ + intercept_``.

The ridge kernel solves many problems at once: per-block sufficient statistics (Gram matrices)
are accumulated in one pass, each training set's Gram is a sum of blocks, and one batched
eigendecomposition per (layer, fold) prices the whole alpha grid. ``alpha`` is chosen by
generalised cross-validation (GCV; Golub, Heath & Wahba 1979) on the training rows, which costs
O(d) per alpha and target after the decomposition. Exact leave-one-out, what scikit-learn's
``RidgeCV`` does, is ``alpha_selection="loo"``: one more n×d×d product per training set, after
which every alpha again costs O(n d). The two pick different alphas when a few rows have high
leverage (the BOS token's massive activations), which moves held-out R² by up to ~3e-3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from torch import Tensor

#: The default ridge grid for standardised features: 10^-2 … 10^6 in half decades.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in 10.0 ** np.arange(-2.0, 6.5, 0.5))

_TINY_VAR = 1e-12

#: how ``alpha`` is chosen from a grid: generalised CV (fast, default) or exact leave-one-out (scikit-learn's RidgeCV)
ALPHA_SELECTIONS = ("gcv", "loo")

#: sums over rows held by other processes too: all-reduce these tensors in place (None: this process has every row)
Reduce = Callable[[Iterable[Tensor]], None] | None


@dataclass
class BlockStats:
    """Sufficient statistics of ridge regression per block of rows (a block = fold × subset).

    Features are centred on ``center`` [L d] before accumulation, which keeps the Gram
    matrices well conditioned when activations have a large mean (massive activations).
    """

    count: Tensor  # [B]
    sum_x: Tensor  # [L B d]
    gram: Tensor  # [L B d d] (diagonal only, [L B d], when built with full=False)
    xy: Tensor  # [L B d T]
    sum_y: Tensor  # [B T]
    yy: Tensor  # [B T]
    center: Tensor  # [L d]


def block_stats(
    X: Tensor, Y: Tensor, block: Tensor, n_blocks: int, dtype: torch.dtype, full: bool = True, reduce: Reduce = None
) -> BlockStats:
    """Accumulate per-block ridge statistics of ``X`` [L n d] against targets ``Y`` [n T].

    ``block`` [n] gives each row's block in ``0..n_blocks-1`` (negative: row unused). ``reduce``: the
    rows are this process's share; the centre and every sum are all-reduced (the same statistics as one
    process holding every row, to float rounding).
    """
    device = X.device
    L, _, d = X.shape
    Y = Y.to(device, dtype)
    T = Y.shape[1]
    center = torch.zeros(L, d, device=device, dtype=dtype)
    used = (block >= 0).nonzero().squeeze(1)
    if reduce is not None:
        total, n_used = X[:, used].to(dtype).sum(1), torch.tensor([float(used.numel())], device=device, dtype=dtype)
        reduce([total, n_used])
        center = total / n_used.clamp(min=1)
    elif used.numel():
        center = X[:, used].to(dtype).mean(1)
    count = torch.zeros(n_blocks, device=device, dtype=dtype)
    sum_x = torch.zeros(L, n_blocks, d, device=device, dtype=dtype)
    gram = torch.zeros((L, n_blocks, d, d) if full else (L, n_blocks, d), device=device, dtype=dtype)
    xy = torch.zeros(L, n_blocks, d, T, device=device, dtype=dtype)
    sum_y = torch.zeros(n_blocks, T, device=device, dtype=dtype)
    yy = torch.zeros(n_blocks, T, device=device, dtype=dtype)
    for b in range(n_blocks):
        idx = (block == b).nonzero().squeeze(1)
        if not idx.numel():
            continue
        Xb = X[:, idx].to(dtype) - center[:, None]
        Yb = Y[idx]
        count[b] = idx.numel()
        sum_x[:, b] = Xb.sum(1)
        gram[:, b] = Xb.mT @ Xb if full else (Xb * Xb).sum(1)
        xy[:, b] = Xb.mT @ Yb
        sum_y[b] = Yb.sum(0)
        yy[b] = (Yb * Yb).sum(0)
    if reduce is not None:
        reduce([count, sum_x, gram, xy, sum_y, yy])
    return BlockStats(count, sum_x, gram, xy, sum_y, yy, center)


@dataclass
class RidgeSolution:
    """Ridge fits for F training sets: raw-unit ``coef`` [L F d T], ``intercept`` [L F T], ``alpha`` [L F T]."""

    coef: Tensor
    intercept: Tensor
    alpha: Tensor

    def predict(self, X: Tensor, fit: int) -> Tensor:
        """Predictions [L n T] of training set ``fit`` for rows ``X`` [L n d]."""
        coef = self.coef[:, fit]
        return X.to(coef.dtype) @ coef + self.intercept[:, fit, None, :]


def _train_moments(stats: BlockStats, train_blocks: Tensor) -> tuple[Tensor, ...]:
    """Sum the blocks of each training set: n [F], mean [L F d], ybar [F T] and centred moments."""
    tb = train_blocks.to(stats.count)
    n = tb @ stats.count
    if (n < 2).any():
        raise ValueError(
            f"a training set has fewer than 2 rows (sizes {n.long().tolist()}); use fewer folds or more data"
        )
    mu = torch.einsum("fb,lbd->lfd", tb, stats.sum_x) / n[:, None]
    ybar = (tb @ stats.sum_y) / n[:, None]
    yyc = tb @ stats.yy - n[:, None] * ybar**2
    xyc = torch.einsum("fb,lbdt->lfdt", tb, stats.xy) - n[:, None, None] * mu[..., None] * ybar[:, None, :]
    return n, mu, ybar, yyc, xyc


def scale_of(var: Tensor) -> Tensor:
    """Standard deviations [..., d] from variances, 1 where a feature is constant (as StandardScaler)."""
    scale = var.clamp(min=0).sqrt()
    return torch.where(var > _TINY_VAR * (1 + var.amax(-1, keepdim=True)), scale, torch.ones_like(scale))


def solve_ridge(
    stats: BlockStats,
    train_blocks: Tensor,
    alphas: Sequence[float],
    selection: str = "gcv",
    data: tuple[Tensor, Tensor, Tensor] | None = None,
    reduce: Reduce = None,
) -> RidgeSolution:
    """Standardised ridge for every layer and every training set (a row of ``train_blocks`` [F B] bool).

    With one alpha it is used as is; with several, each (layer, training set, target) takes the
    alpha of least ``selection`` error: ``"gcv"`` (from the spectrum alone) or ``"loo"`` (exact
    leave-one-out, as scikit-learn's ``RidgeCV``; needs ``data`` = (X [L n d], Y [n T], block [n])
    and costs one n×d×d product per training set). One eigendecomposition per (layer, training
    set) serves all alphas. ``reduce``: ``data`` holds this process's rows; the leave-one-out errors are
    all-reduced (``stats`` must already be).
    """
    if selection not in ALPHA_SELECTIONS:
        raise ValueError(f"unknown alpha selection {selection!r}; accepted: {', '.join(ALPHA_SELECTIONS)}")
    n, mu, ybar, yyc, xyc = _train_moments(stats, train_blocks)
    scale, lam, V = _standardised_spectrum(stats, train_blocks, n, mu)
    Q = V.mT @ (xyc / scale[..., None])  # [L F d T]
    grid = torch.as_tensor(list(alphas), dtype=lam.dtype, device=lam.device)
    mean = mu + stats.center[:, None]  # each training set's feature means in raw units [L F d]
    if grid.numel() == 1:
        alpha = grid.expand(*Q.shape[:2], Q.shape[-1])
    elif selection == "gcv":
        alpha = _gcv_alpha(lam, Q, yyc, n, grid)
    else:
        alpha = _loo_alpha(data, train_blocks, (mean, scale, lam, V, Q, ybar, n), grid, reduce)
    w = V @ (Q / (lam[..., None] + alpha[:, :, None, :]))
    coef = w / scale[..., None]
    intercept = ybar - torch.einsum("lfd,lfdt->lft", mean, coef)
    return RidgeSolution(coef, intercept, alpha)


def _standardised_spectrum(stats: BlockStats, train_blocks: Tensor, n: Tensor, mu: Tensor) -> tuple[Tensor, ...]:
    """Each training set's feature scale [L F d] and the eigenvalues [L F d] (≥ 0) and eigenvectors [L F d d]
    of its standardised covariance (times n)."""
    tb = train_blocks.to(stats.count)
    # [L F d d] matrices are the memory of ridge (0.8 GB each for 30 layers × 10 fits × 576²
    # in float64): the covariance is standardised in place and freed when this returns
    A = torch.einsum("fb,lbde->lfde", tb, stats.gram)
    A.sub_(n[:, None, None] * mu[..., :, None] * mu[..., None, :])
    scale = scale_of(torch.diagonal(A, dim1=-2, dim2=-1) / n[:, None])
    A.div_(scale[..., :, None]).div_(scale[..., None, :])
    lam, V = _eigh(A)
    return scale, lam.clamp(min=0), V


def _gcv_alpha(lam: Tensor, Q: Tensor, yyc: Tensor, n: Tensor, grid: Tensor) -> Tensor:
    """The alpha [L F T] of least generalised cross-validation error, from the spectrum alone (Golub et al. 1979)."""
    den = lam[..., None] + grid  # [L F d A]
    # training residual sum of squares and effective degrees of freedom, all from the spectrum
    rss = yyc[None, :, None, :] - torch.einsum("lfdt,lfda->lfat", Q**2, 2 / den - lam[..., None] / den**2)
    dof = (lam[..., None] / den).sum(-2) + 1  # +1: the intercept
    slack = (1 - dof / n[:, None])[..., None]
    # an alpha that (nearly) interpolates the training rows has rss ≈ 0 and slack ≈ 0: its GCV score
    # is numerically meaningless, not small, so it must never win (fewer tokens than features)
    gcv = torch.where(slack > 1e-3, rss.clamp(min=0) / slack.clamp(min=1e-3) ** 2, torch.inf)
    return grid[gcv.argmin(-2)]  # [L F T]


def _loo_alpha(
    data: tuple[Tensor, Tensor, Tensor] | None,
    train_blocks: Tensor,
    fits: tuple[Tensor, ...],
    grid: Tensor,
    reduce: Reduce = None,
) -> Tensor:
    """The alpha [L F T] of least exact leave-one-out error, a training set at a time; ``fits`` = (mean [L F d]
    in raw units, scale, lam, V, Q, ybar, n [F] the training rows over every process)."""
    if data is None:
        raise ValueError("alpha selection 'loo' needs the rows: pass data=(X, Y, block)")
    X, Y, block = data
    mean, scale, lam, V, Q, ybar, n = fits
    per_fit = []
    for f in range(train_blocks.shape[0]):
        fit = (mean[:, f], scale[:, f], lam[:, f], V[:, f], Q[:, f])
        per_fit.append(_loo_sse(X, Y, train_blocks[f][block], n[f], fit, ybar[f], grid))
    sse = torch.stack(per_fit, dim=1)  # [L F T A]
    if reduce is not None:
        reduce([sse])
    return grid[(sse / n[None, :, None, None]).argmin(-1)]


def _loo_sse(
    X: Tensor,
    Y: Tensor,
    train: Tensor,
    n: Tensor,
    fit: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    ybar: Tensor,
    grid: Tensor,
) -> Tensor:
    """Sum of squared exact leave-one-out residuals [L T A] of one training set's ridge fits over the rows of
    ``train`` held here (``n``: the training set's rows over every process), the intercept unpenalised.

    LOO residual = r_i / (1 − h_i), h_i = 1/n + Σ_k P_ik² / (λ_k + α) with P = Z V (the hat
    matrix's diagonal in the eigenbasis). Layers go in chunks to bound memory. The row-wise work
    (standardising, the n×d×d product P, the hat diagonals and predictions) runs in float32, about
    twice as fast as float64 on a CPU: it only ranks the alphas of the grid, relative errors stay
    near 1e-6 (P is a rotation of standardised rows), and the residuals and their means are
    formed in the solve's dtype. The chosen alpha's fit itself comes from the float64 solve.
    """
    mean, scale, lam, V, Q = fit  # one training set's: [L d], [L d], [L d], [L d d], [L d T]
    rows = train.nonzero().squeeze(1)
    work = torch.float32 if lam.dtype == torch.float64 else lam.dtype
    yc = Y[rows].to(lam) - ybar  # [n T]
    inv = 1 / (lam[..., None] + grid)  # [L d A]
    L, d = lam.shape
    out = []
    step = max(1, 2**25 // max(1, rows.numel() * d))
    for lo in range(0, L, step):
        sl = slice(lo, lo + step)
        Z = X[sl][:, rows].to(work)
        Z.sub_(mean[sl, None].to(work)).div_(scale[sl, None].to(work))
        P = Z @ V[sl].to(work)  # [l n d]
        del Z
        h = (P.square() @ inv[sl].to(work)).to(lam) + 1 / n  # [l n A]
        coef = (Q[sl][..., None] * inv[sl][:, :, None, :]).flatten(2)  # [l d T*A]
        pred = (P @ coef.to(work)).to(lam).unflatten(-1, (yc.shape[1], grid.numel()))
        resid = yc[None, :, :, None] - pred
        out.append(((resid / (1 - h[:, :, None, :])) ** 2).sum(1))
    return torch.cat(out)


def _eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """Batched symmetric eigendecomposition; on CPU one matrix at a time, which LAPACK runs 3-5x faster."""
    if A.device.type != "cpu":
        return torch.linalg.eigh(A)
    flat = A.reshape(-1, *A.shape[-2:])
    lam = torch.empty(flat.shape[:-1], dtype=A.dtype)
    V = torch.empty_like(flat)
    for i, a in enumerate(flat):  # filled in place: no list of results beside the stacked copy
        lam[i], V[i] = torch.linalg.eigh(a)
    return lam.reshape(A.shape[:-1]), V.reshape(A.shape)


def correlation_scores(stats: BlockStats, train_blocks: Tensor) -> Tensor:
    """|Pearson r| of every feature with every target on each training set: [L F d T] (Gurnee et al. 2023)."""
    n, mu, _, yyc, xyc = _train_moments(stats, train_blocks)
    tb = train_blocks.to(stats.count)
    gram_diag = stats.gram if stats.gram.ndim == 3 else torch.diagonal(stats.gram, dim1=-2, dim2=-1)
    var = torch.einsum("fb,lbd->lfd", tb, gram_diag) - n[:, None] * mu**2
    den = (var[..., None].clamp(min=0) * yyc[None, :, None, :].clamp(min=0)).sqrt()
    return torch.where(den > 0, xyc.abs() / den.clamp(min=1e-300), torch.zeros_like(den))


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the k best scores along the last dim, ties to the lower index, sorted ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(-1).values


def fit_logistic(Z: Tensor, y: Tensor, n_classes: int, C: float, max_iter: int, tol: float) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression of ``y`` [n T] on standardised ``Z`` [L n d]: all L × T fits in one LBFGS.

    Minimises, per problem, the mean cross-entropy + ||W||² / (2 C n) (scikit-learn's objective
    divided by n). The problems share no parameters, so the joint optimum is each one's optimum.
    Returns ``W`` [L d T K] and ``b`` [L T K].
    """
    L, n, d = Z.shape
    T = y.shape[1]
    W = torch.zeros(L, d, T * n_classes, dtype=Z.dtype, device=Z.device, requires_grad=True)
    b = torch.zeros(L, 1, T * n_classes, dtype=Z.dtype, device=Z.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=tol * 1e-3,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    target = y.to(Z.device).expand(L, n, T).reshape(-1)

    def closure() -> Tensor:
        opt.zero_grad()
        logits = (Z @ W + b).reshape(L * n * T, n_classes)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum") / n + (W**2).sum() / (2 * C * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach().reshape(L, d, T, n_classes), b.detach().reshape(L, T, n_classes)


def _check_X(X: object) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty [n_samples, n_features] array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    return X


def _check_Xy(X: object, y: object) -> tuple[np.ndarray, np.ndarray]:
    X = _check_X(X)
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be 1-D with one value per row of X ({X.shape[0]}), got shape {y.shape}")
    return X, y


def _ridge_fit(
    X: np.ndarray, y: np.ndarray, alphas: Sequence[float], selection: str
) -> tuple[np.ndarray, float, float]:
    Xt = torch.as_tensor(X)[None]
    Yt = torch.as_tensor(y, dtype=torch.float64)[:, None]
    block = torch.zeros(len(y), dtype=torch.long)
    stats = block_stats(Xt, Yt, block, 1, torch.float64)
    sol = solve_ridge(stats, torch.ones(1, 1, dtype=torch.bool), alphas, selection, (Xt, Yt, block))
    return sol.coef[0, 0, :, 0].numpy(), float(sol.intercept[0, 0, 0]), float(sol.alpha[0, 0, 0])


class RidgeProbe(RegressorMixin, BaseEstimator):
    """Ridge regression of position on standardised activations; ``alpha`` a float or a grid.

    Closed form via the eigendecomposition of the standardised Gram matrix (Haviv et al. 2022
    probe, ridge variant). From a grid, ``alpha_selection`` picks by ``"gcv"`` or exact
    leave-one-out ``"loo"`` (what scikit-learn's ``RidgeCV`` does). Learned: ``coef_``
    [n_features] (raw units), ``intercept_``, ``alpha_``, ``mean_``, ``scale_``.
    """

    def __init__(self, alpha: float | Sequence[float] = 1.0, alpha_selection: str = "loo"):
        self.alpha = alpha
        self.alpha_selection = alpha_selection

    def fit(self, X: object, y: object) -> RidgeProbe:
        X, y = _check_Xy(X, y)
        # np.isscalar's stub narrows to numpy scalars only: say which branch holds which declared type
        alphas = (
            [float(cast(float, self.alpha))]
            if np.isscalar(self.alpha)
            else [float(a) for a in cast("Sequence[float]", self.alpha)]
        )
        if not alphas or min(alphas) < 0:
            raise ValueError(f"alpha must be a non-negative float or a non-empty grid of them, got {self.alpha!r}")
        self.coef_, self.intercept_, self.alpha_ = _ridge_fit(X, y.astype(np.float64), alphas, self.alpha_selection)
        self.mean_ = X.mean(0)
        self.scale_ = scale_of(torch.as_tensor(X.var(0))).numpy()
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: object) -> np.ndarray:
        return _check_X(X) @ self.coef_ + self.intercept_


class SparseProbe(RegressorMixin, BaseEstimator):
    """k-sparse probe: the k features most correlated with the target, then ridge on those k.

    Gurnee et al. 2023 ("Finding neurons in a haystack") rank neurons by a univariate score;
    here |Pearson r| with the target. Learned: ``selected_`` (feature indices, ascending),
    ``scores_`` [n_features], ``coef_`` [n_features] (zero outside ``selected_``), ``intercept_``, ``alpha_``.
    """

    def __init__(self, k: int = 8, alpha: float | Sequence[float] = DEFAULT_ALPHAS, alpha_selection: str = "loo"):
        self.k = k
        self.alpha = alpha
        self.alpha_selection = alpha_selection

    def fit(self, X: object, y: object) -> SparseProbe:
        X, y = _check_Xy(X, y)
        if not isinstance(self.k, int | np.integer) or not 1 <= self.k <= X.shape[1]:
            raise ValueError(f"k must be an integer in 1..{X.shape[1]} (n_features), got {self.k!r}")
        Xc, yc = X - X.mean(0), y.astype(np.float64) - y.mean()
        den = np.sqrt((Xc**2).sum(0) * (yc**2).sum())
        self.scores_ = np.divide(np.abs(Xc.T @ yc), den, out=np.zeros(X.shape[1]), where=den > 0)
        self.selected_ = top_k(torch.as_tensor(self.scores_), int(self.k)).numpy()
        ridge = RidgeProbe(self.alpha, self.alpha_selection).fit(X[:, self.selected_], y)
        self.coef_ = np.zeros(X.shape[1])
        self.coef_[self.selected_] = ridge.coef_
        self.intercept_, self.alpha_ = ridge.intercept_, ridge.alpha_
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: object) -> np.ndarray:
        return _check_X(X) @ self.coef_ + self.intercept_


class LogisticProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic probe (position as a class, as Haviv et al. 2022 probe it), fitted by LBFGS.

    Penalty ||W||²/2 with inverse strength ``C`` (scikit-learn's convention). Learned:
    ``classes_``, ``coef_`` [n_classes, n_features] (raw units; K rows even for 2 classes),
    ``intercept_`` [n_classes]. ``score`` is accuracy.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 200, tol: float = 1e-6):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X: object, y: object) -> LogisticProbe:
        X, y = _check_Xy(X, y)
        if not self.C > 0:
            raise ValueError(f"C must be positive, got {self.C!r}")
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        mean = X.mean(0)
        scale = scale_of(torch.as_tensor(X.var(0))).numpy()
        Z = torch.as_tensor((X - mean) / scale)[None]
        W, b = fit_logistic(Z, torch.as_tensor(y_idx)[:, None], len(self.classes_), self.C, self.max_iter, self.tol)
        self.coef_ = (W[0, :, 0] / torch.as_tensor(scale)[:, None]).T.numpy()
        self.intercept_ = (b[0, 0] - torch.as_tensor(mean) @ torch.as_tensor(self.coef_.T)).numpy()
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X: object) -> np.ndarray:
        return _check_X(X) @ self.coef_.T + self.intercept_

    def predict_proba(self, X: object) -> np.ndarray:
        return torch.softmax(torch.as_tensor(self.decision_function(X)), -1).numpy()

    def predict(self, X: object) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(1)]
