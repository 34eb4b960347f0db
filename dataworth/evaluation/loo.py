"""Leave-one-out agreement on a convex problem, where influence functions should be exact
to first order: L2-regularized softmax regression on a seeded Gaussian mixture.

Objective and the per-example split. With L_i the cross-entropy of example i,

    J(θ) = (1/n) Σ_i L_i(θ) + (λ/2)||θ||² = (1/n) Σ_i ℓ_i(θ),   ℓ_i = L_i + (λ/2)||θ||²,

so every example carries an equal share of the regularizer. Removing example i is the
perturbation J - (1/n) ℓ_i = (1/n) Σ_{j≠i} ℓ_j, whose minimizer is the minimizer of the
same objective on the other n-1 examples with the same λ: the leave-one-out model is
"retrain with the same hyperparameters", which is what `_retrain` does.

Sign and scale. Upweighting, θ_ε = argmin J + ε ℓ_i, gives dθ_ε/dε = -H^{-1} ∇ℓ_i with
H = ∇²J(θ̂). Removal is ε = -1/n, so θ_{-i} - θ̂ ≈ (1/n) H^{-1} ∇ℓ_i and the test loss moves by

    ΔL_test(i) = L_test(θ_{-i}) - L_test(θ̂) ≈ (1/n) ∇L_test^T H^{-1} ∇ℓ_i.

Positive means removing i raises the test loss, i.e. training on i helped; that is the
sign of dataworth's influence score. ∇ℓ_i carries the regularizer share λθ̂, which at the
optimum makes the (1/n) Σ ∇ℓ_i = 0 identity hold exactly.

The Fisher variant goes through dataworth's scoring path (FisherAccumulator → Curvature →
Scorer, identity projection, the weight as one block): the empirical Fisher of the loss
gradients (1/n) Σ ∇L_i ∇L_i^T stands in for the data part of H, and the damping is set to
exactly λ, the regularizer's own Hessian, so the only approximation is Fisher for Hessian.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dataworth.attribution.curvature import FisherAccumulator
from dataworth.attribution.projection import Projector
from dataworth.attribution.scoring import Scorer
from dataworth.config import CurvatureConfig, LoggingConfig
from dataworth.errors import ConfigError
from dataworth.evaluation.lds import pearson, spearman

_DTYPE = torch.float64
# Gradient max-norm at which a fit counts as converged. An error δ in the gradient moves θ
# by at most ~δ/λ, so the LOO test-loss changes (1e-6 to 1e-2 here) are exact to ~1e-9.
_GRAD_TOL = 1e-12


def make_mixture(n: int, n_features: int, n_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of a Gaussian mixture with unit-variance classes around random means, plus a
    constant-1 feature so that the bias is part of the one weight matrix. The class means are
    drawn from N(0, 0.5² I), so classes overlap (roughly 85% training accuracy): the data part
    of the Hessian stays well away from zero and no single example pins down a direction.
    Returns X (n, n_features + 1) float64 and labels y (n,)."""
    gen = torch.Generator().manual_seed(seed)
    means = 0.5 * torch.randn(n_classes, n_features, generator=gen, dtype=_DTYPE)
    y = torch.randint(0, n_classes, (n,), generator=gen)
    x = means[y] + torch.randn(n, n_features, generator=gen, dtype=_DTYPE)
    return torch.cat([x, torch.ones(n, 1, dtype=_DTYPE)], dim=1), y


def softmax_regression(n_inputs: int, n_classes: int) -> nn.Linear:
    """A float64 nn.Linear without bias (the bias is the constant input feature), weights at zero."""
    model = nn.Linear(n_inputs, n_classes, bias=False, dtype=_DTYPE)
    nn.init.zeros_(model.weight)
    return model


def objective(model: nn.Linear, weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """J(weight) = mean cross-entropy + (l2/2)||weight||², evaluated with `weight` swapped in."""
    logits = functional_call(model, {"weight": weight}, (x,))
    return F.cross_entropy(logits, y) + 0.5 * l2 * weight.pow(2).sum()


def per_example_gradients(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """(n, n_classes · n_inputs) gradients of ℓ_i = L_i + (l2/2)||W||², flattened row-major like
    the weight (the layout dataworth's collector uses); l2=0 gives the bare loss gradients."""
    weight = model.weight.detach()

    def one(w, xi, yi):
        return objective(model, w, xi[None], yi[None], l2)

    g = vmap(grad(one), in_dims=(None, 0, 0))(weight, x, y)
    return g.reshape(len(x), -1)


def objective_hessian(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Exact Hessian of J at the model's weight, (p, p) with p = n_classes · n_inputs."""
    weight = model.weight.detach()
    shape = weight.shape
    h = torch.autograd.functional.hessian(lambda w: objective(model, w.view(shape), x, y, l2), weight.reshape(-1))
    return (h + h.T) / 2


def fit(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, l2: float, max_rounds: int = 20) -> nn.Linear:
    """Minimize J in place from the model's current weight (a warm start) with LBFGS, to a
    gradient max-norm below 1e-12."""

    def closure():
        model.weight.grad = None
        loss = objective(model, model.weight, x, y, l2)
        loss.backward()
        return loss

    # The strong-Wolfe line search compares losses, so it stalls near |g| ~ 1e-9, where a
    # step changes J by less than float64 resolves. Unit steps need no loss comparison and,
    # that close to the optimum of a strongly convex J, converge on to round-off level (with
    # the loss-change stop off, since J no longer changes visibly).
    for line_search, rounds, change_tol in (("strong_wolfe", 1, 1e-16), (None, max_rounds, 0.0)):
        opt = torch.optim.LBFGS(
            [model.weight],
            lr=1.0,
            max_iter=200,
            history_size=50,
            tolerance_grad=_GRAD_TOL / 10,
            tolerance_change=change_tol,
            line_search_fn=line_search,
        )
        for _ in range(rounds):
            opt.step(closure)
            closure()
            gnorm = float(model.weight.grad.abs().max())
            if gnorm < _GRAD_TOL:
                return model
    raise RuntimeError(
        f"LBFGS did not reach gradient norm {_GRAD_TOL:g} (got {gnorm:.2e}); raise l2 (now {l2}) "
        "to make the problem better conditioned"
    )


def _test_loss(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def loo_agreement(
    n_train: int = 200,
    n_features: int = 10,
    n_classes: int = 3,
    l2: float = 1e-2,
    n_loo: int = 40,
    seed: int = 0,
    n_test: int = 5,
) -> dict:
    """Predicted vs actual change of the mean test cross-entropy (over n_test held-out points)
    when one training example is removed and the model retrained, for n_loo examples at
    evenly spaced indices (the data are in random order, so these are typical examples).

    Returns {"pearson_hessian", "spearman_hessian", "pearson_fisher", "spearman_fisher"}: the
    correlations of the exact-Hessian influence and of the empirical-Fisher influence (through
    dataworth's Scorer) with the actual changes; "n_loo"; and "predicted_hessian",
    "predicted_fisher", "actual" as lists in the order of the removed indices. Runs single-threaded (and restores
    the thread count after)."""
    if l2 <= 0:
        raise ConfigError(f"l2={l2} must be > 0: without it the Hessian can be singular and LOO fits may diverge")
    if n_classes < 2:
        raise ConfigError(f"n_classes={n_classes} must be at least 2")
    if n_features < 1 or n_test < 1:
        raise ConfigError(f"n_features={n_features} and n_test={n_test} must both be at least 1")
    if not 3 <= n_loo <= n_train:
        raise ConfigError(f"n_loo={n_loo} must lie in [3, n_train={n_train}] for a correlation to mean anything")
    # Every op here is on a ~33-dim problem: extra threads only add synchronization, and on a
    # busy machine their spin-waits made a 3 s run take 100 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _loo_agreement(n_train, n_features, n_classes, l2, n_loo, seed, n_test)
    finally:
        torch.set_num_threads(threads)


def _loo_agreement(n_train, n_features, n_classes, l2, n_loo, seed, n_test) -> dict:
    x, y = make_mixture(n_train + n_test, n_features, n_classes, seed)
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    model = fit(softmax_regression(n_features + 1, n_classes), x_train, y_train, l2)
    theta = model.weight.detach().clone()
    base_loss = _test_loss(model, x_test, y_test)

    train_grads = per_example_gradients(model, x_train, y_train, l2)  # ∇ℓ_i, with the regularizer share
    test_grad = per_example_gradients(model, x_test, y_test, 0.0).mean(dim=0)  # ∇ of the mean test loss
    hessian = objective_hessian(model, x_train, y_train, l2)
    predicted_hessian = train_grads @ torch.linalg.solve(hessian, test_grad) / n_train

    layout = Projector({"linear": model}, LoggingConfig(projection="identity", precondition="none")).layout
    acc = FisherAccumulator(layout, CurvatureConfig(kind="raw"))
    acc.update(per_example_gradients(model, x_train, y_train, 0.0))  # dataworth logs bare loss gradients
    curvature = acc.finalize()
    # dataworth damps by factor × mean eigenvalue; this factor makes the damping exactly l2.
    curvature = curvature.with_damping(l2 / float(curvature.blocks["linear"][0].mean()))
    scorer = Scorer(test_grad[None], curvature, ["influence"], top_k=1, full_matrix_size=n_train, dtype=_DTYPE)
    scorer.update(torch.arange(n_train), train_grads)
    predicted_fisher = scorer.full["influence"][0] / n_train

    indices = torch.linspace(0, n_train - 1, n_loo).round().long()
    actual = torch.empty(n_loo, dtype=_DTYPE)
    keep = torch.ones(n_train, dtype=torch.bool)
    for k, i in enumerate(indices.tolist()):
        keep[i] = False
        with torch.no_grad():
            model.weight.copy_(theta)
        fit(model, x_train[keep], y_train[keep], l2)
        actual[k] = _test_loss(model, x_test, y_test) - base_loss
        keep[i] = True

    ph, pf = predicted_hessian[indices].numpy(), predicted_fisher[indices].numpy()
    a = actual.numpy()
    return {
        "pearson_hessian": pearson(ph, a),
        "spearman_hessian": spearman(ph, a),
        "pearson_fisher": pearson(pf, a),
        "spearman_fisher": spearman(pf, a),
        "n_loo": n_loo,
        "predicted_hessian": ph.tolist(),
        "predicted_fisher": pf.tolist(),
        "actual": a.tolist(),
    }
