"""The logistic head by full-batch L-BFGS in torch, on the CPU or a CUDA device (`fit-head --solver torch`, and
`--solver auto` on large stores).

It minimises scikit-learn's LogisticRegression objective, C * sum_i s_i loss_i + ||W||^2 / 2 (intercept not
penalised, s_i the class weights), divided by sum_i s_i as scikit-learn's lbfgs does, and stops by the same rule
(max |gradient| <= 1e-4, at most 200 iterations), so its coefficients are scikit-learn's at the same C. Two classes
take one logit (binomial loss) and more the multinomial loss, as in scikit-learn.

The training rows are read from the store in chunks straight into one float32 device tensor and normalised there,
sorted by cross-validation fold. Cross-validation solves the folds together: one parameter block per fold, each
fold's held-out rows weighted 0 in its own loss and skipped (they are one block of rows), so that one pass over the
rows (in chunks) serves every fold. The sum of the fold objectives is separable, so each block's gradient is its
fold's own and the stopping rule holds per fold. Each C starts from the solutions at the C values solved before:
interpolated in log C between the two around it (a refined value), else the nearest; the final fit starts from the
folds' mean at its C. Warm starts reach the same optimum as a cold start, so a score depends on the values scored
before it only within the stopping tolerance. A solve that stops at the iteration limit counts as not converged
(cv.py reports it).

Preconditioning: L-BFGS runs on U with W = (U * s) V^T, where V holds the eigenvectors of the rows' second moment
(from a sample of rows) and s = (curvature * eigenvalue + 1 / (C * rows))^-1/2, so that the objective's Hessian is
close to the identity in U. The minimiser and the stopping rule stay those of W: the solve stops at the first
evaluated point where max |gradient in W| <= 1e-4. It takes about half the iterations of L-BFGS on W.
"""
from __future__ import annotations

import numpy as np

from ..cpu import idle_cores, torch_threads
from ..options import OptionError
from .cv import score
from .class_weights import balanced_weights
from .estimators import LBFGS_MAX_ITER, make_normalizer

GRADIENT_TOL = 1e-4  # scikit-learn's default tol: max |gradient| of the scaled objective
EVALS_PER_ITER = 4  # loss evaluations allowed per iteration on average (line searches)
PRECONDITION_MAX_FEATURES = 4096  # wider rows are solved without preconditioning (the eigenbasis costs d^3)
PRECONDITION_SAMPLE_ROWS = 8192  # rows whose second moment gives the eigenbasis


class _Converged(Exception):
    """Raised from the L-BFGS closure at the first point that meets the stopping rule in W; holds (W, b)."""


class TorchFit:
    """Torch L-BFGS training of the logistic head on store rows `train` (sorted) with class indices `y`. The rows
    are read on first use (set_folds, fit or X), so it is used while `rows` is open, like the other trainers."""

    stepwise = True  # scoring values one call at a time costs nothing extra (cv.search may stop early)

    def __init__(self, head_type, options, rows, train: np.ndarray, y: np.ndarray, n_classes: int, normalize: str,
                 chunk_rows: int, n_jobs: int | None):
        if not str(options.device).strip().lower().startswith("cuda"):  # before torch takes its address space
            rows.check_fits_in_memory(len(train))
        import torch

        from ..runtime import resolve_device

        self.head_type, self.options = head_type, options
        self.n_classes, self.chunk_rows = n_classes, chunk_rows
        device = resolve_device(options.device)
        if device.type == "mps" and str(options.device).strip().lower() == "auto":
            device = torch.device("cpu")  # auto: CUDA when present, else the CPU
        if device.type not in ("cpu", "cuda"):
            raise OptionError("{device=}: {solver=torch} runs on cpu or cuda", device=options.device)
        self.device = device
        # CPU solves use the idle cores only: on cores busy with other processes torch's OpenMP threads spin at every
        # barrier for a core another process holds (100,000 rows x 1280 on 2 cores at load 2.5: 124 s with 2
        # threads, 42 s with 1; benchmarks/results/scale-heads-2026-12-04.md)
        self.threads = min(torch.get_num_threads(), idle_cores()) if device.type == "cpu" else None
        self._source = (rows, train, np.asarray(y), normalize)  # read on first use, in fold order once known
        self._X = self.y = self.normalizer = None
        self.fold_of = None  # fold of each row of X
        self._blocks: list[tuple[int, int]] = []  # per fold, its held-out rows X[lo:hi]
        self.scoring = "accuracy"
        self.converged = True  # of the last fit
        self._solutions: dict[float, tuple] = {}  # C -> the folds' solutions (W, b) at that C
        self._basis = None  # (eigenvalues, eigenvectors) of the rows' second moment, once needed

    @property
    def X(self):
        """The normalised float32 training rows on the device, read from the store on first use."""
        if self._X is None:
            self._load(np.arange(len(self._source[1])))
        return self._X

    def _load(self, order: np.ndarray) -> None:
        """Read the rows into X with training row order[i] at X[i]."""
        import torch

        rows, train, y, normalize = self._source
        self._X = None  # a previous copy goes first
        self.normalizer, self._X = _rows_on_device(rows, train, order, normalize, self.chunk_rows, self.device)
        self.y = torch.as_tensor(y[order], device=self.device)

    def set_folds(self, folds, scoring: str) -> None:
        """Use (train, test) position pairs from cv.make_folds for `score_grid`. The rows are read (or re-read)
        sorted by fold, so that each fold's held-out rows are one block: a fold's parameters are never applied to
        its own held-out rows, a fifth of the work with five folds."""
        import torch

        fold_of = np.empty(len(self._source[1]), dtype=np.int64)
        for f, (_, test) in enumerate(folds):
            fold_of[test] = f
        order = np.argsort(fold_of, kind="stable")
        self._load(order)
        self.fold_of = torch.as_tensor(fold_of[order], device=self.device)
        ends = np.cumsum(np.bincount(fold_of, minlength=len(folds)))
        self._blocks = list(zip([0, *ends[:-1]], ends))
        self.scoring = scoring

    def score_grid(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, converged): (len(values), folds) held-out scores, the folds solved together along ascending C,
        each C warm-started from the solutions at the C values solved so far, and whether each solve stopped
        before the iteration limit."""
        problems = self._problems([self.fold_of != f for f in range(len(self._blocks))], self._blocks)
        scores = np.empty((len(values), len(self._blocks)))
        converged = np.empty((len(values), len(self._blocks)), dtype=bool)
        for i in np.argsort(values):
            C = float(values[i])
            with torch_threads(self.threads):
                W, b, n_iter = self._solve(C, problems, self._start(C))
            converged[i] = n_iter < LBFGS_MAX_ITER
            self._solutions[C] = (W, b)
            for f, (lo, hi) in enumerate(self._blocks):
                predicted = self._predict(W[f], b[f], lo, hi)
                scores[i, f] = score(self.y[lo:hi].cpu().numpy(), predicted, self.scoring, self.n_classes)
        return scores, converged

    def fit(self, C: float):
        """The head at C on all training rows, as Pipeline([('normalize', ...), ('head', LogisticRegression)]);
        sets `converged`."""
        import torch
        from sklearn.pipeline import Pipeline

        C = float(C)
        everything = torch.ones(len(self.X), dtype=torch.bool, device=self.device)
        folds = self._solutions.get(C)
        start = tuple(t.mean(0, keepdim=True) for t in folds) if folds else None
        with torch_threads(self.threads):
            W, b, n_iter = self._solve(C, self._problems([everything]), start)
        self.converged = n_iter < LBFGS_MAX_ITER
        estimator = self.head_type.build(C, len(self.y), self.options)
        estimator.classes_ = np.arange(self.n_classes)
        estimator.coef_ = W[0].double().cpu().numpy()
        estimator.intercept_ = b[0].double().cpu().numpy()
        estimator.n_features_in_ = self.X.shape[1]
        estimator.n_iter_ = np.array([n_iter], dtype=np.int32)
        return Pipeline([("normalize", self.normalizer), ("head", estimator)])

    def _start(self, C: float):
        """The warm start at C: between two solved values, the solutions interpolated linearly in log C (a
        refined value lies between two decades); beyond them, the nearest solution; None before any."""
        below = [c for c in self._solutions if c < C]
        above = [c for c in self._solutions if c > C]
        if below and above:
            lo, hi = max(below), min(above)
            t = np.log(C / lo) / np.log(hi / lo)
            return tuple((1 - t) * a + t * z for a, z in zip(self._solutions[lo], self._solutions[hi]))
        if below or above:
            return self._solutions[max(below) if below else min(above)]
        return None

    def _problems(self, masks, blocks=()):
        """What `_solve` solves: (weights, totals, chunks). weights (problems, rows) holds each problem's rows
        (a mask of X's rows), times their 'balanced' class weights (counted on that problem's rows) when asked;
        totals their sums, so each loss is a weighted mean. chunks are (lo, hi, problems) row ranges of at most
        chunk_rows rows and the problems that weigh them: with `blocks` (fold f holds out X[lo:hi] of
        blocks[f]), every problem but f's; else all (None)."""
        import torch

        weights = torch.stack([mask.to(torch.float32) for mask in masks])
        if self.options.class_weight == "balanced":
            for weight, mask in zip(weights, masks):
                table = balanced_weights(self.y[mask].cpu().numpy(), self.n_classes)
                per_class = torch.tensor([table.get(k, 0.0) for k in range(self.n_classes)], dtype=weight.dtype,
                                         device=self.device)
                weight *= per_class[self.y]
        spans = [(lo, hi, torch.tensor([g for g in range(len(masks)) if g != f], device=self.device))
                 for f, (lo, hi) in enumerate(blocks)] or [(0, len(self.X), None)]
        chunks = [(start, min(start + self.chunk_rows, hi), problems) for lo, hi, problems in spans
                  for start in range(lo, hi, self.chunk_rows)]
        return weights, weights.sum(1), chunks

    def _logits(self, W, b, lo: int, hi: int):
        """(problems, outputs, rows) logits of rows lo:hi under each problem's parameters."""
        problems, outputs, d = W.shape
        return W.reshape(-1, d).matmul(self.X[lo:hi].T).add_(b.reshape(-1, 1)).view(problems, outputs, -1)

    def _solve(self, C: float, problems, start):
        """(W, b, iterations): per problem (a row of the weights of `problems`, see _problems) the minimiser at C,
        from `start` or zeros; LBFGS_MAX_ITER iterations when it stopped before reaching the gradient tolerance."""
        import torch
        import torch.nn.functional as F

        weights, totals, chunks = problems
        outputs = 1 if self.n_classes == 2 else self.n_classes
        if start is None:
            W = self.X.new_zeros((len(weights), outputs, self.X.shape[1]))
            b = self.X.new_zeros((len(weights), outputs))
        else:
            W, b = (t.expand(len(weights), *t.shape[1:]) for t in start)
        variables = _Preconditioner(self._eigenbasis(), C, totals, outputs)
        U, c = (t.clone().requires_grad_(True) for t in variables.from_weights(W, b))
        scaled = weights / totals[:, None]

        def chunk_loss(W, b, lo, hi, active):
            row_weights = scaled[:, lo:hi]
            if active is not None:
                W, b, row_weights = W[active], b[active], row_weights[active]
            z = self._logits(W, b, lo, hi)
            y = self.y[lo:hi]
            if outputs == 1:
                losses = F.binary_cross_entropy_with_logits(z[:, 0], y.to(z.dtype).expand(len(z), -1),
                                                            reduction="none")
            else:
                losses = torch.logsumexp(z, dim=1) - z.gather(1, y.expand(len(z), 1, -1))[:, 0]
            return (losses * row_weights).sum()

        max_eval = EVALS_PER_ITER * LBFGS_MAX_ITER
        optimizer = torch.optim.LBFGS([U, c], lr=1, max_iter=LBFGS_MAX_ITER, max_eval=max_eval, tolerance_grad=0.0,
                                      tolerance_change=1e-12, history_size=10, line_search_fn="strong_wolfe")

        def closure():
            with torch.no_grad():
                W, b = (t.requires_grad_(True) for t in variables.to_weights(U, c))
            value = 0.0
            for lo, hi, active in chunks:
                part = chunk_loss(W, b, lo, hi, active)
                part.backward()
                value += part.detach()
            penalty = ((W * W).sum((1, 2)) / (2.0 * C * totals)).sum()
            penalty.backward()
            if max(W.grad.abs().max(), b.grad.abs().max()) <= GRADIENT_TOL:
                raise _Converged(W.detach(), b.detach())
            U.grad, c.grad = variables.gradients(W.grad, b.grad)
            return value + penalty.detach()

        try:
            optimizer.step(closure)
        except _Converged as done:
            W, b = done.args
            return W, b, int(optimizer.state[U].get("n_iter", 0))
        state = optimizer.state[U]
        n_iter = int(state.get("n_iter", 0))
        if state.get("func_evals", 0) >= max_eval:  # stopped by the evaluation budget: not converged either
            n_iter = LBFGS_MAX_ITER
        with torch.no_grad():
            W, b = variables.to_weights(U, c)
        return W, b, n_iter

    def _eigenbasis(self):
        """(eigenvalues, eigenvectors) of the second moment of up to PRECONDITION_SAMPLE_ROWS evenly spaced rows,
        computed once; None for rows wider than PRECONDITION_MAX_FEATURES."""
        import torch

        if self._basis is None and self.X.shape[1] <= PRECONDITION_MAX_FEATURES:
            sample = self.X[:: max(1, len(self.X) // PRECONDITION_SAMPLE_ROWS)]
            values, vectors = torch.linalg.eigh(sample.T @ sample / len(sample))
            self._basis = values.clamp_min(0), vectors
        return self._basis

    def _predict(self, W, b, lo: int, hi: int) -> np.ndarray:
        """Class indices of rows lo:hi under one problem's (W, b): the sign of the one logit, or the largest."""
        import torch

        with torch.no_grad():
            z = self._logits(W[None], b[None], lo, hi)[0]
            return ((z[0] > 0).long() if len(z) == 1 else z.argmax(0)).cpu().numpy()


def _rows_on_device(rows, train: np.ndarray, order: np.ndarray, normalize: str, chunk_rows: int, device):
    """(fitted normalizer, normalised float32 rows on `device` with row train[order[i]] at i), read from the store
    in chunks."""
    import torch

    normalizer = make_normalizer(normalize)
    stateless = not hasattr(normalizer, "partial_fit")
    if stateless:
        normalizer.fit(np.zeros((1, rows.n_features), dtype=np.float32))
    place = torch.empty(len(order), dtype=torch.long, device=device)
    place[torch.as_tensor(order, device=device)] = torch.arange(len(order), device=device)
    try:
        X = torch.empty((len(train), rows.n_features), dtype=torch.float32, device=device)
        filled = 0
        for _, block in rows.iter_chunks(train, chunk_rows):
            if not stateless:
                normalizer.partial_fit(block)
            X.index_copy_(0, place[filled : filled + len(block)], torch.from_numpy(block).to(device))
            filled += len(block)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
            raise
        need = len(train) * rows.n_features * 4
        raise OptionError("{rows}: {n} rows x {features} float32 features ({gb:.1f} GB) do not fit on {device}: use "
                          "{solver=sklearn} or {head=sgd}", rows=rows.describe(), n=len(train),
                          features=rows.n_features, gb=need / 1e9, device=device) from None
    if normalize == "standard":
        X -= torch.as_tensor(normalizer.mean_, dtype=X.dtype, device=device)
        X /= torch.as_tensor(normalizer.scale_, dtype=X.dtype, device=device)
    elif normalize == "l2":  # Normalizer's arithmetic: zero rows stay zero
        norms = torch.linalg.vector_norm(X, dim=1)
        norms[norms == 0] = 1.0
        X /= norms[:, None]
    return normalizer, X


class _Preconditioner:
    """The change of variables W = (U * s) V^T, b = c / sqrt(curvature) of one solve at C (see the module's
    docstring); the identity when there is no eigenbasis. `curvature` is the loss's at the start, 1/4 for one
    logit and 1/K for K classes."""

    def __init__(self, basis, C: float, totals, outputs: int):
        import torch

        self.basis = basis
        self.root = (0.25 if outputs == 1 else 1.0 / outputs) ** 0.5
        if basis is not None:
            values, self.vectors = basis
            self.s = torch.rsqrt(self.root**2 * values[None, :] + 1.0 / (C * totals[:, None]))[:, None, :]

    def to_weights(self, U, c):
        if self.basis is None:
            return U.detach().clone(), c.detach().clone()
        return (U * self.s) @ self.vectors.T, c / self.root

    def from_weights(self, W, b):
        if self.basis is None:
            return W, b
        return (W @ self.vectors) / self.s, b * self.root

    def gradients(self, W_grad, b_grad):
        """The gradient in (U, c) from the gradient in (W, b)."""
        if self.basis is None:
            return W_grad, b_grad
        return (W_grad @ self.vectors) * self.s, b_grad / self.root
