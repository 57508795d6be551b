"""``torch.optim``-style GAM / SAM: a wrapper around any base optimizer, for plain PyTorch, Lightning and timm loops.

    opt = GAM(model.parameters(), torch.optim.SGD, mode="gam_fast", lr=0.1, momentum=0.9)

    def closure():
        return loss_fn(model(x), y)          # the loss at the current weights, with its graph

    loss = opt.step(closure)                 # runs the mode's passes, puts the direction in p.grad, steps the base

The interface follows the wrappers people use today: davda54/sam ``SAM(params, base_optimizer, rho, adaptive,
**kwargs)`` (https://github.com/davda54/sam, ``sam.py``: the wrapper shares the base optimizer's ``param_groups``, so
LR schedulers built on the wrapper drive the base), the released GAM code ``GAM(params, base_optimizer, model, ...)``
(https://github.com/xxgege/GAM, ``gam/gam.py``; its ``ProportionScheduler`` in ``gam/util.py`` is our
``rho_schedule="lr_proportional"``) and pytorch_optimizer's ``SAM(params, base_optimizer, rho, adaptive)``.
Every update rule is :func:`hf_gam.core.step.apply_direction_step` / :mod:`hf_gam.core.directions`: this file only
turns a closure into gradient oracles and steps the base optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .core.directions import MODES, GAMHyper
from .core.collectives import shard_layout
from .core.oracles import SHARDED_HVP_REASON, SHARDED_LOCAL_REASON, WindowOracle
from .core.step import apply_direction_step, loss_scale_of

__all__ = ["GAM", "SAM"]

class _ClosureOracle(WindowOracle):
    """The oracles of :mod:`hf_gam.core.oracles` over a user closure, in either style:

    - graph style: the closure returns the loss with its autograd graph and runs no backward; gradients (and HVPs)
      come from ``torch.autograd.grad`` on it;
    - backward style: the closure runs ``loss.backward()`` itself (davda54/sam, Lightning's automatic
      optimization); the gradients are read from ``p.grad`` and cleared. Exact-HVP modes then need
      ``loss.backward(create_graph=True)``.
    """

    def __init__(self, mode: str, model: nn.Module, params: list[Tensor], closure: Callable[[], Tensor], *,
                 reduce: bool, loss_scale: float | None, pass_context):
        super().__init__(model, params, [None], lambda _: closure(), lambda _: 1, reduce=reduce,
                         loss_scale=loss_scale, pass_context=pass_context)
        self.mode = mode

    def _pass(self, batch, create_graph: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        self.passes += 1
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = self.loss_fn(batch)
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        if not isinstance(loss, Tensor):
            raise TypeError(f"GAM.step: the closure must return the loss tensor; got {type(loss).__name__}")
        if all(g is None for g in grads):  # graph style
            if loss.grad_fn is None:
                raise ValueError("GAM.step: the closure returned a loss without autograd graph and ran no backward; "
                                 "return the loss computed under grad mode (not .item()/.detach()), or call "
                                 "loss.backward() inside the closure (first-order modes)")
            return self._graph_grad(loss, create_graph)
        if create_graph and not any(g is not None and g.grad_fn is not None for g in grads):
            raise ValueError(f"GAM.step: mode {self.mode!r} takes exact Hessian-vector products and the closure ran "
                             "loss.backward() without create_graph=True; return the loss (with its graph) from the "
                             "closure instead of calling backward, or call loss.backward(create_graph=True)")
        g = self._materialize([None if x is None else (x if create_graph else x.detach()) for x in grads])
        return loss.detach(), g

    def _backward_pass(self, batch, factor: float) -> Tensor:
        """FSDP2: the closure's gradient in ``p.grad``, reduce-scattered by FSDP. A graph-style closure gets its
        ``backward`` here: ``torch.autograd.grad`` would return None for sharded parameters, and the step would not
        move the weights."""
        self.passes += 1
        with torch.enable_grad():
            loss = self.loss_fn(batch)
        if not isinstance(loss, Tensor):
            raise TypeError(f"GAM.step: the closure must return the loss tensor; got {type(loss).__name__}")
        if all(p.grad is None for p in self.params):  # graph style
            if loss.grad_fn is None:
                raise ValueError("GAM.step: the closure returned a loss without autograd graph and ran no backward; "
                                 "return the loss computed under grad mode (not .item()/.detach()), or call "
                                 "loss.backward() inside the closure")
            (loss if factor == 1.0 else loss * factor).backward()
        return loss.detach()

    def _graph_grad(self, loss: Tensor, create_graph: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        scaled = loss if self.loss_scale is None else loss * self.loss_scale
        g = torch.autograd.grad(scaled, self.params, create_graph=create_graph, allow_unused=True)
        return loss, self._materialize(g)


class GAM(Optimizer):
    r"""GAM, SAM and their relatives (``mode=``) around any ``torch.optim`` optimizer.

    Args:
        params: the parameters (or param-group dicts) to optimize, as for any optimizer. With a base optimizer
            *instance* pass the same parameters (or ``None``).
        base_optimizer: an optimizer class (built here as ``base_optimizer(params, **kwargs)``) or an instance.
        mode: ``"gam_fast"`` (the default, as ``GAMConfig``'s: Algorithm 2, four first-order passes), ``"gam"``
            (Algorithm 1, exact HVPs), ``"sam"``, ``"gam_sam"``, ``"gnp"`` or ``"none"`` (plain gradient: the base
            optimizer unchanged).
        rho, alpha, sam_rho, rho_prime, beta, gamma, eps, variant, adaptive: :class:`hf_gam.GAMHyper`'s fields
            (``GAMConfig``'s ``gam_*`` fields without the prefix); ``None`` takes the mode's default, the same as
            ``GAMConfig``'s (``sam_rho`` defaults to ``rho``). Every value is checked by :meth:`GAMHyper.check`
            before anything runs; an error names the argument and the value.
        every: run the mode on steps ``t % every == 0`` (``t`` counts ``step`` calls from 0), the plain gradient
            otherwise (``gam_every``).
        rho_schedule: ``"constant"`` or ``"lr_proportional"``: every radius times ``r + (1-r)·lr/peak_lr`` (clipped
            to [0, 1]), ``r = rho_min_ratio``, ``lr`` the base optimizer's first group's current learning rate,
            ``peak_lr`` its ``initial_lr`` (set by LR schedulers) or its learning rate at construction
            (``gam_rho_schedule``, the released code's ``ProportionScheduler``).
        max_grad_norm: clip the final direction to this global norm (``clip_grad_norm_``) before the base step.
        grad_scaler: a ``torch.amp.GradScaler`` for fp16: a non-finite value in any pass skips the whole step
            (weights and base optimizer state untouched) and lowers the scale; ``step`` calls the scaler's
            ``unscale_``, ``step`` and ``update`` itself (do not call them).
        model: the module the closure runs: its BatchNorm running statistics are kept from the clean pass only, and
            under DDP (a ``DistributedDataParallel`` model) the passes run under ``model.no_sync()``.
        perturbation: ``"local"``: each process computes its direction from its own batch, then one all-reduce
            (mean) of the directions; ``"global"``: every pass's gradient (and HVP) is averaged over processes
            inside the oracle, so all processes perturb with the global gradient (equal per-process batches).
            ``None`` (default): ``"global"`` on FSDP2-sharded parameters, ``"local"`` otherwise.

    **FSDP2** (parameters sharded by ``fully_shard``, the root module included): ``none``, ``sam`` (``adaptive``) and
    ``gam_fast`` run with a global perturbation, in both closure styles; every pass runs ``backward()`` and FSDP
    reduce-scatters its gradient; the math runs on the local shards. Exact-HVP modes and ``perturbation="local"``
    are refused at construction (docs/fsdp.md).
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ``weight_decay``, ...) when it is a class.

    **The closure** takes no argument and computes the loss of the current batch *at the current weights*; ``step``
    calls it once per pass (1 to 5 times, the mode decides) while it moves the weights. It must:

    - run the full forward pass every time (no cached outputs or losses from an earlier call);
    - either **return the loss with its graph** and not call ``backward`` (works in every mode; required by
      ``gam``, ``gam_sam`` and ``gnp`` unless they get ``loss.backward(create_graph=True)``), or call
      ``loss.backward()`` itself and return the loss (davda54/sam's and Lightning's automatic-optimization style;
      first-order modes ``sam``, ``gam_fast``, ``none``). ``optimizer.zero_grad()`` inside the closure is fine.
    - with ``grad_scaler``, return the *unscaled* loss (graph style), or call ``grad_scaler.scale(loss).backward()``
      (backward style). Autocast (bf16/fp16) goes inside the closure or around ``step``.

    It must not step any optimizer or change the weights. ``step`` returns the clean loss (the first pass's). Gradients already in ``p.grad`` are ignored
    and replaced; after ``step`` ``p.grad`` holds the direction the base optimizer used.

    A pass that raises leaves the weights bit-for-bit as they were (and BatchNorm statistics, with ``model=``), the
    base optimizer untouched, and ``p.grad`` cleared. ``state_dict()`` is the base optimizer's plus a ``"gam"`` entry
    (step counter, peak learning rate); LR schedulers can be built on this wrapper or on ``base_optimizer``.
    """

    def __init__(self, params: Iterable | None, base_optimizer: type[Optimizer] | Optimizer = torch.optim.SGD, *,
                 mode: str = "gam_fast", rho: float | None = None, alpha: float | None = None,
                 sam_rho: float | None = None, rho_prime: float | None = None, beta: float | None = None,
                 gamma: float | None = None, eps: float | None = None, variant: str | None = None,
                 adaptive: bool | None = None, every: int = 1, rho_schedule: str = "constant",
                 rho_min_ratio: float = 0.5, max_grad_norm: float | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None, model: nn.Module | None = None,
                 perturbation: str | None = None, **kwargs: Any):
        self.hyper = GAMHyper.for_mode(mode, rho=rho, alpha=alpha, sam_rho=sam_rho, rho_prime=rho_prime, beta=beta,
                                     gamma=gamma, eps=eps, variant=variant, adaptive=adaptive)
        GAMHyper.check(every=every, rho_schedule=rho_schedule, rho_min_ratio=rho_min_ratio,
                       max_grad_norm=max_grad_norm, **({} if perturbation is None else {"perturbation": perturbation}))
        if isinstance(base_optimizer, Optimizer):
            if kwargs:
                raise TypeError(f"GAM: base optimizer arguments {sorted(kwargs)} given with a base optimizer "
                                "instance; set them on the instance (or pass its class)")
            base = base_optimizer
            if params is not None:
                given = {id(p) for p in _flat_params(params)}
                if given != {id(p) for g in base.param_groups for p in g["params"]}:
                    raise ValueError("GAM: params are not the parameters of the base optimizer instance")
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            base = base_optimizer(params, **kwargs)
        else:
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class or instance; got {base_optimizer!r}")
        super().__init__(base.param_groups, dict(base.defaults))
        self.base_optimizer = base
        self._share_base()
        self.every, self.rho_schedule, self.rho_min_ratio = every, rho_schedule, rho_min_ratio
        self.max_grad_norm, self.grad_scaler, self.model, self.perturbation = (max_grad_norm, grad_scaler, model,
                                                                                 perturbation)
        self.perturbation = _perturbation_for(self.hyper.mode, self._params(), perturbation)
        self.peak_lr = float(self.param_groups[0].get("initial_lr", self.param_groups[0]["lr"]))
        self.step_count = 0
        self.last_stats: dict[str, Tensor] = {}

    def _share_base(self) -> None:
        """One set of groups and state for wrapper and base (LR schedulers on either drive the same ``lr``)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # Optimizer.__init__ registering the base's groups
            self.param_groups.append(param_group)
        else:
            base.add_param_group(param_group)

    @property
    def needs_graph(self) -> bool:
        """Whether the mode takes exact HVPs (a backward-style closure then needs ``create_graph=True``)."""
        return MODES[self.hyper.mode].hvp

    def current_hyper(self) -> GAMHyper:
        """This step's hyper-parameters: the mode's, or ``none`` on steps skipped by ``every``; under
        ``lr_proportional`` the radii at the base optimizer's current learning rate
        (:meth:`GAMHyper.at_learning_rate`, the Trainer's rule)."""
        h = self.hyper
        if h.mode == "none" or self.step_count % self.every != 0:
            return dataclasses.replace(h, mode="none")
        if self.rho_schedule == "constant":
            return h
        group = self.param_groups[0]
        return h.at_learning_rate(float(group["lr"]), float(group.get("initial_lr", self.peak_lr)),
                                  self.rho_min_ratio)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _loss_scale(self) -> float | None:
        return loss_scale_of(self.grad_scaler, self._params()[0].device)

    def _pass_context(self) -> contextlib.AbstractContextManager:
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if callable(no_sync) else contextlib.nullcontext()

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One step: the mode's passes through ``closure`` (see the class docstring), the direction in ``p.grad``,
        clipping, the base optimizer's step. Returns the loss of the clean pass."""
        if closure is None:
            raise TypeError("GAM.step needs a closure that returns the loss at the current weights, e.g. "
                            "opt.step(lambda: loss_fn(model(x), y)); see help(hf_gam.optim.GAM)")
        params = self._params()
        hyper = self.current_hyper()
        scale = self._loss_scale()
        oracle = _ClosureOracle(hyper.mode, self.model if self.model is not None else nn.Module(), params, closure,
                                reduce=self.perturbation == "global", loss_scale=scale,
                                pass_context=self._pass_context)
        for p in params:  # gradients from before the step are not part of it
            p.grad = None
        # p.grad = S·d in the parameter's layout (fused optimizers do not check strides); unreached: None
        stats = apply_direction_step(hyper, params, oracle, average_over_processes=self.perturbation == "local")
        self.step_count += 1
        self.last_stats = stats
        if scale is not None:
            self.grad_scaler.unscale_(self.base_optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if scale is not None:
            self.grad_scaler.step(self.base_optimizer)
            self.grad_scaler.update()
        else:
            self.base_optimizer.step()
        return stats["loss"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` plus ``"gam"``: the step counter (``every``'s phase) and the peak
        learning rate of the ρ schedule."""
        sd = self.base_optimizer.state_dict()
        sd["gam"] = {"step": self.step_count, "peak_lr": self.peak_lr}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gam = state_dict.pop("gam", None)
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()  # the base's load_state_dict builds new group dicts
        if gam is not None:
            self.step_count, self.peak_lr = int(gam["step"]), float(gam["peak_lr"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.hyper.mode!r}, base={self.base_optimizer!r})"


class SAM(GAM):
    """SAM (Foret et al. 2021) around any base optimizer: ``GAM(..., mode="sam")``; ``rho`` is SAM's radius
    (default 0.05, davda54/sam's), ``adaptive=True`` is ASAM. See :class:`GAM` for the closure and the options."""

    def __init__(self, params: Iterable | None, base_optimizer: type[Optimizer] | Optimizer = torch.optim.SGD,
                 rho: float | None = None, adaptive: bool | None = None, **kwargs: Any):
        # davda54/sam's signature: SAM(params, base_optimizer, rho=0.05, adaptive=False, **kwargs), rho positional too
        kwargs.setdefault("mode", "sam")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)


def _perturbation_for(mode: str, params: list[Tensor], perturbation: str | None) -> str:
    """The perturbation to run (unset: ``"global"`` on FSDP2-sharded parameters, ``"local"`` otherwise), after
    refusing, before any compute, what cannot run on sharded parameters."""
    if shard_layout(params) is None:
        return perturbation or "local"
    if MODES[mode].hvp:
        raise ValueError(f"mode={mode!r} does not run under FSDP2: {SHARDED_HVP_REASON}")
    if perturbation == "local":
        raise ValueError(f"perturbation='local' does not run under FSDP2: {SHARDED_LOCAL_REASON}; leave perturbation "
                         "unset (global under FSDP2)")
    return "global"


def _flat_params(params: Iterable) -> list[Tensor]:
    out: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            ps = item["params"]
            out.extend([ps] if isinstance(ps, Tensor) else list(ps))
        else:
            out.append(item)
    return out
