"""TrackStar's optimizer-state correction: gradients divided by the square root of Adam's second moment.

A training step of Adam moves weight w by about -lr · m / (√v + ε), so the directions the optimizer
actually takes are the gradient's divided elementwise by √v (Chang et al. 2024, TrackStar): without the
correction a few weights with large, noisy gradients (layer norms, the first layers) dominate every inner
product. The elementwise form G / √V does not commute with a Kronecker projection P_out G P_inᵀ, so it is
used in Adafactor's factored form (Shazeer & Stern 2018): for a layer's second moment V (d_out × d_in) with
row sums R = V 1, column sums C = Vᵀ 1 and total S = 1ᵀ V 1,

    V ≈ V̂ = R Cᵀ / S,    so    √V̂ = a bᵀ  with  a = √(R / √S),  b = √(C / √S),

and G / √V̂ = diag(1/a) G diag(1/b): the input activations are scaled by 1/b and the output gradients by
1/a, which folds into the projection matrices (P_in diag(1/b), P_out diag(1/a)) and leaves the LoGra hooks
as they are. Adam's ε is kept as √ε added to each factor, so a weight whose v is 0 is scaled by 1/ε as in
Adam's own step: s_out = 1 / (a + √ε), s_in = 1 / (b + √ε). v is bias-corrected by 1 / (1 - β₂^step).
`factored_error` says how far the factored form is from the exact elementwise one, per layer.

The state is read from a saved torch optimizer state dict (`optimizer.state_dict()`, e.g. the
`optimizer.pt` of a transformers Trainer checkpoint). Its parameters are numbered, not named: the names
come from the state's `param_names` (optimizers built from `model.named_parameters()`), else from the
model's parameters in order, as one group or split as the Trainer splits them (weights with weight decay
first, then biases and norm weights), the first numbering whose every shape matches the state's.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from dataworth.attribution.projection import Conv1D, select_modules
from dataworth.config import LoggingConfig
from dataworth.errors import ConfigError, ModelError
from dataworth.training import OPTIMIZER_FILE


@dataclass
class SecondMoments:
    """Bias-corrected second moments v̂ of the optimizer, by parameter name (CPU, float64)."""

    moments: dict[str, torch.Tensor]
    eps: float
    step: int
    meta: dict = field(default_factory=dict)


def optimizer_state_file(path: str) -> str:
    """The state file of `path`: the file itself, or the `optimizer.pt` of a checkpoint directory."""
    p = os.path.expanduser(path)
    if os.path.isdir(p):
        f = os.path.join(p, OPTIMIZER_FILE)
        if not os.path.isfile(f):
            raise ConfigError(
                f"logging.optimizer_state {path!r} is a directory without {OPTIMIZER_FILE}; give the optimizer state "
                "file (torch.save(optimizer.state_dict(), ...)) or a Trainer checkpoint directory that has one"
            )
        return f
    if not os.path.isfile(p):
        raise ConfigError(
            f"logging.optimizer_state {path!r} does not exist; give the optimizer state file saved with training "
            "(torch.save(optimizer.state_dict(), ...), a Trainer checkpoint's optimizer.pt) or leave it unset"
        )
    return p


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or "norm" in type(module).__name__.lower()


def _candidate_orders(model: nn.Module, group_sizes: list[int]) -> list[tuple[str, list[str]]]:
    """Ways the optimizer may have numbered the model's trainable parameters, most likely first."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    owner = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    no_decay = {n for n in names if n.endswith("bias") or _is_norm(owner.get(n, nn.Module()))}
    trainer = [n for n in names if n not in no_decay] + [n for n in names if n in no_decay]
    orders = [("parameters in model order", names)]
    if len(group_sizes) == 2 and group_sizes[0] == len(names) - len(no_decay):
        orders.insert(0, ("Trainer's decay / no-decay groups", trainer))
    return orders


def load_second_moments(path: str, model: nn.Module) -> SecondMoments:
    """v̂ per parameter name from a saved Adam/AdamW state dict (see the module docstring for the numbering)."""
    f = optimizer_state_file(path)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that is not a plain state dict, a truncated file
        raise ConfigError(
            f"cannot read optimizer state {f!r}: {err}. Save it with torch.save(optimizer.state_dict())"
        ) from err
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise ConfigError(
            f"{f!r} is not an optimizer state dict (no 'state' / 'param_groups'); save optimizer.state_dict()"
        )
    groups = state["param_groups"]
    if not groups:
        raise ConfigError(f"optimizer state {f!r} has no parameter groups")
    indices = [i for g in groups for i in g["params"]]
    if not any("exp_avg_sq" in s for s in state["state"].values()):
        first = state["state"].get(indices[0], {}) if indices else {}
        raise ConfigError(
            f"optimizer state {f!r} has no 'exp_avg_sq' (Adam's second moment): the correction needs an Adam or AdamW "
            f"state (keys found: {sorted(first)[:6]})"
        )
    names, how = _parameter_names(f, state, model)
    group_of = {i: g for g in groups for i in g["params"]}
    moments, steps, eps = {}, set(), set()
    for i, name in zip(indices, names):
        s = state["state"].get(i)
        if not s or "exp_avg_sq" not in s:
            continue
        step = int(float(s.get("step", 0)))
        beta2 = float(group_of[i].get("betas", (0.9, 0.999))[1])
        correction = 1.0 - beta2**step if step > 0 else 1.0
        moments[name] = s["exp_avg_sq"].to(torch.float64) / correction
        steps.add(step)
        eps.add(float(group_of[i].get("eps", 1e-8)))
    return SecondMoments(moments, max(eps) if eps else 1e-8, max(steps) if steps else 0, {"file": f, "numbering": how})


def _parameter_names(f: str, state: dict, model: nn.Module) -> tuple[list[str], str]:
    """(the model's parameter name of each numbered parameter of the state, how they were told apart)."""
    groups = state["param_groups"]
    indices = [i for g in groups for i in g["params"]]
    params = dict(model.named_parameters())
    if all("param_names" in g for g in groups):
        names = [n for g in groups for n in g["param_names"]]
        missing = [n for n in names if n not in params]
        if missing:
            raise ModelError(
                f"optimizer state {f!r} names parameters the model does not have ({missing[:3]}): it was saved for "
                "another model; give the optimizer state of the checkpoint being attributed"
            )
        return names, "the state's param_names"
    for label, order in _candidate_orders(model, [len(g["params"]) for g in groups]):
        if len(order) == len(indices) and all(
            "exp_avg_sq" not in state["state"].get(i, {})
            or tuple(state["state"][i]["exp_avg_sq"].shape) == tuple(params[n].shape)
            for i, n in zip(indices, order)
        ):
            return order, label
    raise ModelError(
        f"optimizer state {f!r} numbers {len(indices)} parameters and no numbering of the model's "
        f"{sum(p.requires_grad for p in model.parameters())} trainable parameters matches their shapes: it "
        "was saved for another model or with custom parameter groups. Build the optimizer from "
        "model.named_parameters() so its state names them, and save that"
    )


def factored_scales(v: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_in [d_in], s_out [d_out]) with G / √V ≈ diag(s_out) G diag(s_in), for V (d_out × d_in) ≥ 0."""
    v = v.to(torch.float64).clamp(min=0.0)
    total = float(v.sum())
    root = math.sqrt(eps)
    if total <= 0.0:  # no update yet: every weight is scaled as Adam scales a zero second moment
        return torch.full((v.shape[1],), 1.0 / root, dtype=torch.float64), torch.full(
            (v.shape[0],), 1.0 / root, dtype=torch.float64
        )
    norm = math.sqrt(total)
    a = (v.sum(1) / norm).sqrt()
    b = (v.sum(0) / norm).sqrt()
    return 1.0 / (b + root), 1.0 / (a + root)


def factored_error(v: torch.Tensor, eps: float) -> float:
    """‖1/(√V + ε) - s_out s_inᵀ‖_F / ‖1/(√V + ε)‖_F: how far the factored correction is from the exact one."""
    v = v.to(torch.float64).clamp(min=0.0)
    exact = 1.0 / (v.sqrt() + eps)
    s_in, s_out = factored_scales(v, eps)
    return float((exact - s_out[:, None] * s_in[None, :]).norm() / exact.norm())


def layer_moments(modules: dict[str, nn.Module], state: SecondMoments) -> dict[str, torch.Tensor]:
    """v̂ of each tracked module's weight as (d_out, d_in) (Conv1D stores (in, out)); a module the state has no
    second moment for is an error."""
    out = {}
    for name, module in modules.items():
        key = f"{name}.weight"
        if key not in state.moments:
            raise ModelError(
                f"optimizer state {state.meta['file']!r} has no second moment for {key!r} (a tracked layer): the "
                "layer was frozen or not optimized. Exclude it (logging.exclude_modules) or give the full state"
            )
        v = state.moments[key]
        out[name] = v.T if Conv1D and isinstance(module, Conv1D) else v
    return out


def optimizer_scales(model: nn.Module, cfg: LoggingConfig) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """({module: (s_in, s_out)}, meta) for every tracked module, from cfg.optimizer_state; meta records the
    state file, its step and ε, and each module's `factored_error`."""
    if not cfg.optimizer_state:
        raise ConfigError("logging.optimizer_state is not set: give the optimizer state file to correct by")
    state = load_second_moments(cfg.optimizer_state, model)
    moments = layer_moments(select_modules(model, cfg.modules, cfg.exclude_modules), state)
    scales = {name: factored_scales(v, state.eps) for name, v in moments.items()}
    errors = {name: factored_error(v, state.eps) for name, v in moments.items()}
    meta = {**state.meta, "step": state.step, "eps": state.eps, "factored_error": errors}
    return scales, meta
