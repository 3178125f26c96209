"""`fit-head --solver torch`: torch L-BFGS minimises scikit-learn's logistic objective at the same C (coefficients
agree), stops by the same rule in the original coefficients while preconditioned, chooses C by the same
cross-validation, warm-starts along the grid, and saves a head that predicts and evaluates like any other.
`--solver auto` (the default) takes it on large stores."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import featx.cpu as cpu
import featx.heads.torchfit as torchfit
from featx import evaluate, fit_head, load_head
from featx.errors import FeatxError
from heads_support import every_fifth_val, write_rows

N, D = 600, 20


def overlapping_store(path, k, seed=0):
    """(X, y) of k overlapping Gaussian classes (no class is separable, so every C has a finite optimum)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, N)
    X = (rng.normal(size=(k, D))[y] * 0.8 + rng.normal(size=(N, D))).astype(np.float32)
    write_rows(path, X, y, splits=every_fifth_val(N), classes=["a", "b", "c", "d"][:k], extra_tap=False)
    train = every_fifth_val(N) == "train"
    return X[train], y[train]


def centred(b):
    return b - b.mean() if b.size > 1 else b


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_coefficients_match_sklearn_at_the_same_c(tmp_path, monkeypatch, k, C, class_weight):
    """Both solved tightly, the two optima agree to float32 accuracy: the objective (and C) is the same."""
    monkeypatch.setattr(torchfit, "GRADIENT_TOL", 1e-6)
    X, y = overlapping_store(tmp_path / "s.h5", k)
    head = fit_head(tmp_path / "s.h5", "avgpool", grid=C, solver="torch", device="cpu", class_weight=class_weight)
    ours = head.estimator.named_steps["head"]
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000, class_weight=class_weight).fit(
        StandardScaler().fit_transform(X), y)
    assert ours.coef_.shape == ref.coef_.shape == ((1 if k == 2 else k), D)
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=2e-3 * scale, rtol=0)
    np.testing.assert_allclose(centred(ours.intercept_), centred(ref.intercept_), atol=2e-3 * max(scale, 1), rtol=0)


def test_default_tolerance_is_as_close_to_the_optimum_as_sklearn(tmp_path):
    """With the shared stopping rule (max |gradient| <= 1e-4), torch lands no further from the exact optimum than
    scikit-learn's own lbfgs does (sklearn's error, doubled, bounds ours)."""
    X, y = overlapping_store(tmp_path / "s.h5", 3)
    Xs = StandardScaler().fit_transform(X)
    for C in (0.1, 10.0):
        exact = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(Xs, y).coef_
        sklearn = fit_head(tmp_path / "s.h5", "avgpool", grid=C).estimator.named_steps["head"].coef_
        ours = fit_head(tmp_path / "s.h5", "avgpool", grid=C, solver="torch").estimator.named_steps["head"].coef_
        assert np.abs(ours - exact).max() <= 2 * np.abs(sklearn - exact).max() + 1e-4


def test_cross_validation_matches_the_sklearn_path(tmp_path):
    overlapping_store(tmp_path / "s.h5", 3)
    ours = fit_head(tmp_path / "s.h5", "avgpool", grid="1e-3:1e2", solver="torch")
    theirs = fit_head(tmp_path / "s.h5", "avgpool", grid="1e-3:1e2")
    a, b = ours.metrics["cv"], theirs.metrics["cv"]
    assert a["grid"] + a["skipped"] == b["grid"] and b["skipped"] == [] and a["folds"] == b["folds"] == 5
    np.testing.assert_allclose(a["mean"], b["mean"][: len(a["mean"])], atol=0.02)
    assert abs(np.log10(ours.C) - np.log10(theirs.C)) <= 0.5
    assert abs(ours.metrics["accuracy"] - theirs.metrics["accuracy"]) <= 0.02
    assert ours.metrics["solver"] == "torch" and theirs.metrics["solver"] == "sklearn"


def test_warm_starts_along_the_grid(tmp_path, monkeypatch):
    """The folds walk C upwards from the previous solution, and the refit starts from the folds' mean: the refit
    takes fewer iterations than a cold start from zero."""
    overlapping_store(tmp_path / "s.h5", 3)
    solves = []
    solve = torchfit.TorchFit._solve

    def recording(self, C, weights, start):
        W, b, n_iter = solve(self, C, weights, start)
        solves.append((C, W.shape[0], start is not None, n_iter))
        return W, b, n_iter

    monkeypatch.setattr(torchfit.TorchFit, "_solve", recording)
    head = fit_head(tmp_path / "s.h5", "avgpool", grid=[10.0, 0.01, 1.0, 0.1], solver="torch")
    assert [(C, folds, warm) for C, folds, warm, _ in solves[:4]] == [
        (0.01, 5, False), (0.1, 5, True), (1.0, 5, True), (10.0, 5, True)]
    final_C, problems, final_warm, final_iter = solves[4]
    assert len(solves) == 5 and final_C == head.C and problems == 1 and final_warm
    cold = fit_head(tmp_path / "s.h5", "avgpool", grid=head.C, solver="torch").estimator.named_steps["head"]
    assert final_iter < cold.n_iter_[0]


def test_folds_solved_together_equal_folds_solved_alone(tmp_path, monkeypatch):
    """Each fold's block of the joint solve is that fold's own optimum (the joint objective is separable)."""
    monkeypatch.setattr(torchfit, "GRADIENT_TOL", 1e-6)
    X, y = overlapping_store(tmp_path / "s.h5", 3)
    from featx.heads.cv import make_folds
    from featx.heads.data import open_rows
    from featx.heads.estimators import HEAD_TYPES, HeadOptions

    folds = make_folds(y, 3, ["a", "b", "c"], 0)
    with open_rows(tmp_path / "s.h5", "avgpool") as rows:
        train = np.flatnonzero(rows.splits == "train")
        fit = torchfit.TorchFit(HEAD_TYPES["logistic"], HeadOptions(device="cpu"), rows, train, y, 3, "standard",
                                100, 1)
        fit.set_folds(folds, "accuracy")
        W, _, _ = fit._solve(1.0, fit._problems([fit.fold_of != f for f in range(3)], fit._blocks), None)
    Xs = StandardScaler().fit_transform(X)
    for f, (fold_train, _) in enumerate(folds):
        ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(Xs[fold_train], y[fold_train]).coef_
        np.testing.assert_allclose(W[f].numpy(), ref, atol=2e-3 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("normalize", ["standard", "l2", "none"])
def test_saved_head_predicts_and_evaluates_like_the_pipeline(tmp_path, normalize):
    X, _ = overlapping_store(tmp_path / "s.h5", 3)
    head = fit_head(tmp_path / "s.h5", "avgpool", tmp_path / "head", grid=1.0, normalize=normalize,
                    solver="torch", plots=False)
    loaded = load_head(tmp_path / "head")
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), rtol=1e-10, atol=1e-12)
    assert evaluate(tmp_path / "head", tmp_path / "s.h5", split="val")["accuracy"] == head.metrics["accuracy"]


def test_normalisation_on_the_device_equals_sklearn(tmp_path):
    """The rows normalised on the device are the ones scikit-learn's normaliser gives."""
    from sklearn.preprocessing import Normalizer

    X, y = overlapping_store(tmp_path / "s.h5", 3)
    X[:3] = 0  # zero rows: Normalizer leaves them alone
    write_rows(tmp_path / "z.h5", np.concatenate([X, X[:30]]), np.concatenate([y, y[:30]]), classes=["a", "b", "c"],
               extra_tap=False)
    from featx.heads.data import open_rows
    from featx.heads.estimators import HEAD_TYPES, HeadOptions

    with open_rows(tmp_path / "z.h5", "avgpool") as rows:
        train = np.arange(rows.n_rows)
        for mode, expected in (("standard", StandardScaler().fit_transform(rows.read())),
                               ("l2", Normalizer().fit_transform(rows.read()))):
            fit = torchfit.TorchFit(HEAD_TYPES["logistic"], HeadOptions(device="cpu"), rows, train, rows.labels, 3,
                                    mode, 64, 1)
            np.testing.assert_allclose(fit.X.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_bad_solver_options_are_one_line_errors(tmp_path):
    overlapping_store(tmp_path / "s.h5", 3)
    with pytest.raises(FeatxError, match=r"solver='torch': only the logistic head.*head='ridge'"):
        fit_head(tmp_path / "s.h5", "avgpool", head="ridge", solver="torch")
    with pytest.raises(FeatxError, match=r"solver='jax': expected one of auto, sklearn, torch"):
        fit_head(tmp_path / "s.h5", "avgpool", solver="jax")
    with pytest.raises(FeatxError, match=r"device='cpu': only solver='torch' runs on a device"):
        fit_head(tmp_path / "s.h5", "avgpool", solver="sklearn", device="cpu")
    with pytest.raises(FeatxError, match=r"device='cpu': only the logistic head runs on a device .*head='ridge'"):
        fit_head(tmp_path / "s.h5", "avgpool", head="ridge", device="cpu")
    with pytest.raises(FeatxError, match=r"device='tpu'"):
        fit_head(tmp_path / "s.h5", "avgpool", solver="torch", device="tpu")


def test_cli_without_cuda_is_one_line_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    overlapping_store(tmp_path / "s.h5", 3)
    done = subprocess.run(
        [sys.executable, "-m", "featx", "fit-head", str(tmp_path / "s.h5"), "-o", str(tmp_path / "h"),
         "--solver", "torch", "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "featx: error: --device cuda: CUDA is not available on this machine (use --device cpu or auto)"]
    assert not (tmp_path / "h").exists()


def test_cli_fits_with_the_torch_solver(tmp_path):
    overlapping_store(tmp_path / "s.h5", 3)
    done = subprocess.run(
        [sys.executable, "-m", "featx", "fit-head", str(tmp_path / "s.h5"), "-o", str(tmp_path / "h"),
         "--solver", "torch", "--device", "cpu", "--grid", "0.01,1", "--no-plots", "--json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"solver": "torch"' in done.stdout and load_head(tmp_path / "h").kind == "logistic"


@pytest.mark.cuda
def test_cuda_solution_equals_the_cpu_one(tmp_path):
    overlapping_store(tmp_path / "s.h5", 3)
    cpu = fit_head(tmp_path / "s.h5", "avgpool", grid="1e-2:1e2", solver="torch", device="cpu")
    gpu = fit_head(tmp_path / "s.h5", "avgpool", grid="1e-2:1e2", solver="torch", device="cuda")
    assert gpu.C == cpu.C
    a, b = (h.estimator.named_steps["head"].coef_ for h in (cpu, gpu))
    np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max(), rtol=0)


def test_iteration_limit_is_reported_as_not_converged(tmp_path, monkeypatch):
    monkeypatch.setattr(torchfit, "LBFGS_MAX_ITER", 2)
    overlapping_store(tmp_path / "s.h5", 3)
    cv = fit_head(tmp_path / "s.h5", "avgpool", grid=[0.1, 10.0], solver="torch").metrics["cv"]
    assert cv["not_converged"][0] == 5  # the cold start at the smallest C needs more than 2 iterations
    assert fit_head(tmp_path / "s.h5", "avgpool", grid=1.0, solver="torch").metrics["converged"] is False
    monkeypatch.setattr(torchfit, "LBFGS_MAX_ITER", 200)
    assert fit_head(tmp_path / "s.h5", "avgpool", grid=1.0, solver="torch").metrics["converged"] is True


def correlated_store(path, n=1500, d=64, k=4, seed=0):
    """Rows whose features share a few strong directions (a decaying spectrum, like pooled embeddings)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    latent = rng.normal(size=(k, 6))[y] * 0.7 + rng.normal(size=(n, 6))
    X = (latent @ rng.normal(size=(6, d)) * 3 + rng.normal(size=(n, d))).astype(np.float32)
    write_rows(path, X, y, classes=["a", "b", "c", "d"][:k], extra_tap=False)


def solver_for(path, C_values=(0.01, 1.0)):
    """A TorchFit on every row of `path` with 3 folds, and its fold weights."""
    from featx.heads.cv import make_folds
    from featx.heads.data import open_rows
    from featx.heads.estimators import HEAD_TYPES, HeadOptions

    with open_rows(path, "avgpool") as rows:
        y = rows.labels.copy()
        fit = torchfit.TorchFit(HEAD_TYPES["logistic"], HeadOptions(device="cpu"), rows, np.arange(rows.n_rows), y,
                                len(rows.classes), "standard", 512, 1)
        fit.set_folds(make_folds(y, 3, list("abcd")[: y.max() + 1], 0), "accuracy")  # reads the rows
    return fit, fit._problems([fit.fold_of != f for f in range(3)], fit._blocks)


def gradient_in_w(fit, problems, C, W, b):
    """max |gradient| of the scaled objective at (W, b), by autograd on the plain objective over every row (each
    problem's held-out rows weighted 0), neither preconditioned nor by fold blocks."""
    import torch

    weights, totals, _ = problems
    W, b = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    z = fit._logits(W, b, 0, len(fit.X))
    losses = torch.logsumexp(z, dim=1) - z.gather(1, fit.y.expand(len(z), 1, -1))[:, 0]
    objective = (losses * weights / totals[:, None]).sum() + ((W * W).sum((1, 2)) / (2.0 * C * totals)).sum()
    objective.backward()
    return max(W.grad.abs().max().item(), b.grad.abs().max().item())


@pytest.mark.parametrize("C", [0.001, 0.1, 10.0])
def test_preconditioned_solve_stops_by_the_rule_in_w_in_fewer_iterations(tmp_path, monkeypatch, C):
    """The solve stops at a point where the gradient in the original coefficients meets the tolerance, and on
    correlated rows it needs fewer iterations than L-BFGS on W itself (preconditioning off: no eigenbasis), which
    at larger C stalls in float32 above the tolerance."""
    correlated_store(tmp_path / "s.h5")
    fit, weights = solver_for(tmp_path / "s.h5")
    W, b, n_iter = fit._solve(C, weights, None)
    assert gradient_in_w(fit, weights, C, W, b) <= torchfit.GRADIENT_TOL
    monkeypatch.setattr(torchfit, "PRECONDITION_MAX_FEATURES", 0)
    plain, plain_fit = solver_for(tmp_path / "s.h5")
    _, _, plain_iter = plain._solve(C, plain_fit, None)
    assert plain._basis is None and fit._basis is not None
    assert n_iter < plain_iter


def test_warm_starts_interpolate_between_solved_values(tmp_path, monkeypatch):
    """A C between two solved values starts from their solutions interpolated linearly in log C; beyond them,
    from the nearest."""
    import torch

    correlated_store(tmp_path / "s.h5")
    fit, _ = solver_for(tmp_path / "s.h5")
    starts = []
    solve = torchfit.TorchFit._solve

    def recording(self, C, problems, start):
        starts.append((C, start, dict(self._solutions)))
        return solve(self, C, problems, start)

    monkeypatch.setattr(torchfit.TorchFit, "_solve", recording)
    fit.score_grid(np.array([10.0, 0.01, 1.0]))
    fit.score_grid(np.array([0.1]))
    (_, first, _), (_, second, solved), (_, third, _), (C, between, before) = starts
    assert first is None and second is solved[0.01] and third is starts[2][2][1.0]
    t = np.log(C / 0.01) / np.log(1.0 / 0.01)
    for got, lo, hi in zip(between, before[0.01], before[1.0]):
        torch.testing.assert_close(got, (1 - t) * lo + t * hi)


def test_fold_blocks_give_the_solution_of_the_masked_objective(tmp_path):
    """Rows sorted by fold, each fold's parameters skip its own held-out block: the same minimiser as weighing the
    held-out rows 0 over every row."""
    import torch

    correlated_store(tmp_path / "s.h5")
    fit, blocked = solver_for(tmp_path / "s.h5")
    weights, totals, _ = blocked
    everywhere = (weights, totals, [(0, len(fit.X), None)])
    W, b, _ = fit._solve(0.1, blocked, None)
    W_all, b_all, _ = fit._solve(0.1, everywhere, None)
    torch.testing.assert_close(W, W_all, atol=2e-3 * W_all.abs().max().item(), rtol=0)
    assert [hi - lo for lo, hi in fit._blocks] == torch.bincount(fit.fold_of).tolist()
    assert all((fit.fold_of[lo:hi] == f).all() for f, (lo, hi) in enumerate(fit._blocks))


@pytest.mark.parametrize(("solver", "head", "work", "device", "chosen"), [
    ("auto", "logistic", 10**9, "auto", "torch"),
    ("auto", "logistic", 1000, "auto", "sklearn"),
    ("auto", "logistic", 1000, "cpu", "torch"),
    ("auto", "ridge", 10**9, "auto", "sklearn"),
    ("auto", "sgd", 10**9, "auto", "sklearn"),
    ("sklearn", "logistic", 10**9, "auto", "sklearn"),
    ("torch", "logistic", 1000, "auto", "torch"),
])
def test_auto_solver_choice(solver, head, work, device, chosen):
    from featx.heads.api import choose_solver

    assert choose_solver(solver, head, work, device) == chosen


def test_auto_solver_takes_torch_from_the_threshold_on(tmp_path, monkeypatch):
    import featx.heads.api as api

    overlapping_store(tmp_path / "s.h5", 3)
    train_work = (N * 4 // 5) * D
    monkeypatch.setattr(api, "TORCH_MIN_WORK", train_work + 1)
    assert fit_head(tmp_path / "s.h5", "avgpool", grid="1e-2:1e1").metrics["solver"] == "sklearn"
    monkeypatch.setattr(api, "TORCH_MIN_WORK", train_work)
    head = fit_head(tmp_path / "s.h5", "avgpool", grid="1e-2:1e1")
    assert head.metrics["solver"] == "torch" and head.metrics["accuracy"] > 0.5


def test_cpu_solves_use_the_idle_cores(tmp_path, monkeypatch):
    """Cores busy with other processes (as much CPU time as there are cores) leave the solves one thread;
    idle ones, torch's own count; the count is restored after each solve."""
    import torch

    from featx.heads.data import open_rows
    from featx.heads.estimators import HEAD_TYPES, HeadOptions

    overlapping_store(tmp_path / "s.h5", 3)
    threads = torch.get_num_threads()
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 4)
    for load, idle in ((4.0, 1), (2.6, 1), (1.4, 3), (0.0, 4)):
        monkeypatch.setattr(cpu, "busy_cores", lambda: load)
        assert torchfit.idle_cores() == idle
    seen = []
    monkeypatch.setattr(cpu, "busy_cores", lambda: 4.0)
    solve = torchfit.TorchFit._solve
    monkeypatch.setattr(torchfit.TorchFit, "_solve", lambda *args: seen.append(torch.get_num_threads()) or solve(*args))
    with open_rows(tmp_path / "s.h5", "avgpool") as rows:
        train = np.flatnonzero(rows.splits == "train")
        fit = torchfit.TorchFit(HEAD_TYPES["logistic"], HeadOptions(device="cpu"), rows, train, rows.labels[train],
                                3, "standard", 256, 1)
        fit.fit(1.0)
    assert fit.threads == 1 and seen == [1] and torch.get_num_threads() == threads
