r"""Optimizers that take a compiled step's outputs, BackPACK-style attributes, dense blocks.

- :class:`DiagGGNOptimizer`: SGD preconditioned by a curvature diagonal (BackPACK's DiagGGN
  example), ``p ← p − γ · g / (diag G + λ)``.
- :class:`CGNewton`: HBP's Newton-CG: per parameter block solve ``(C + αI) d = −g`` by
  conjugate gradients with the step's block products, then ``p ← p + lr · d``.
- :func:`attach`: run a step and write its results onto the parameters (``p.grad``,
  ``p.grad_batch``, ``p.diag_ggn_mc``, ``p.hmp(vec)``, ...) for code written for BackPACK.
- :func:`curvature_blocks`: the dense curvature block ``[P, P]`` of every parameter, for small
  layers (tests, inspection).

The dicts the step returns are keyed by ``model.named_parameters()`` names. The optimizers
find a parameter's entry by its name, so build them from ``model.named_parameters()``
(``torch.optim.Optimizer`` keeps the names in ``group["param_names"]``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["DiagGGNOptimizer", "CGNewton", "CURVATURES", "PRODUCTS", "attach",
           "curvature_blocks"]

# CGNewton's curvature choice -> the product quantity the step must compute
CURVATURES = {"ggn": "ggnmp", "hessian": "hmp", "pch_abs": "pchmp_abs", "pch_clip": "pchmp_clip"}
PRODUCTS = tuple(CURVATURES.values())
# every name a quantity is attached under (BackPACK stores per-sample gradients as grad_batch)
ATTRIBUTE_NAMES = {"batch_grad": ("grad_batch", "batch_grad"),
                   "grad_batch": ("grad_batch", "batch_grad")}

Vectors = Dict[str, Tensor]


def _named_params(group: dict, who: str) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of a param group built from ``named_parameters()``."""
    if "param_names" not in group:
        raise TypeError(f"{who} looks up the step's results by parameter name: build it from "
                        "model.named_parameters() (not model.parameters()).")
    return list(zip(group["param_names"], group["params"]))


class DiagGGNOptimizer(torch.optim.Optimizer):
    r"""SGD preconditioned by a curvature diagonal (BackPACK's DiagGGN example, seeds 000/001).

    Elementwise, for every parameter ``p`` with gradient ``g`` and curvature diagonal ``G``:

    .. math::  p \leftarrow p - \gamma \, g / (G + \lambda)

    with ``γ = step_size`` and ``λ = damping``. ``G`` is meant to be a GGN diagonal
    (``diag_ggn_mc`` or ``diag_ggn_exact``: non-negative, so ``G + λ > 0``).

    Two ways to feed it:

    1. the step's dicts (build the optimizer from ``model.named_parameters()``)::

           opt = DiagGGNOptimizer(model.named_parameters(), step_size=0.01, damping=1.0)
           step = fxcurv.compile(model, loss_fn, ["diag_ggn_mc"])
           loss, grad, diag_ggn_mc = step(x, y)
           opt.step(grad, diag_ggn_mc)

    2. without arguments, BackPACK-style: it reads ``p.grad`` and ``p.<savefield>`` (e.g. set
       by :func:`attach`); ``model.parameters()`` is fine here::

           opt = DiagGGNOptimizer(model.parameters(), 0.01, 1.0, savefield="diag_ggn_exact")
           fxcurv.optim.attach(model, step, x, y)
           opt.step()

    Parameters without a gradient (no entry in ``grad``, or ``p.grad is None``) are skipped.
    """

    def __init__(self, params, step_size: float, damping: float,
                 savefield: str = "diag_ggn_mc"):
        if step_size < 0 or damping < 0:
            raise ValueError(f"step_size and damping must be >= 0, got {step_size}, {damping}")
        super().__init__(params, dict(step_size=step_size, damping=damping))
        self.savefield = savefield

    @torch.no_grad()
    def step(self, grad: Optional[Dict[str, Tensor]] = None,
             curvature: Optional[Dict[str, Tensor]] = None) -> None:
        """``p ← p − step_size · grad / (curvature + damping)`` for every parameter."""
        if (grad is None) != (curvature is None):
            raise TypeError("pass both grad and curvature (dicts from the step), or neither "
                            "(to read p.grad and p.%s)" % self.savefield)
        for group in self.param_groups:
            for p, g, diag in self._triples(group, grad, curvature):
                p.add_(g / (diag + group["damping"]), alpha=-group["step_size"])

    def _triples(self, group: dict, grad, curvature) -> Iterator[tuple]:
        """``(parameter, gradient, curvature diagonal)`` of each parameter that has a gradient."""
        if grad is None:
            for p in group["params"]:
                if p.grad is not None:
                    yield p, p.grad, self._attribute(p)
            return
        for name, p in _named_params(group, "DiagGGNOptimizer.step(grad, curvature)"):
            if name in grad:
                yield p, grad[name], curvature[name]

    def _attribute(self, p: Tensor) -> Tensor:
        value = getattr(p, self.savefield, None)
        if value is None:
            raise AttributeError(f"a parameter of shape {list(p.shape)} has no "
                                 f".{self.savefield}: run fxcurv.optim.attach(model, step, x, y) "
                                 f"with a step compiled with [{self.savefield!r}] first, or pass "
                                 "the step's dicts: opt.step(grad, curvature).")
        return value


class CGNewton(torch.optim.Optimizer):
    r"""Newton steps over curvature blocks, solved by conjugate gradients (HBP's ``CGNewton``).

    For every parameter block ``p`` (``P = p.numel()`` entries) with gradient ``g`` and
    curvature block ``C`` (the block of ``p`` in the GGN, the Hessian or the positive-curvature
    Hessian of the mini-batch loss), it solves

    .. math::  [(1 - \alpha)\, C + \alpha I]\, d = -g

    by conjugate gradients (CG) and applies ``p ← p + lr · d``. ``alpha`` ∈ [0, 1] is HBP's
    regularisation (Dangel, Kunstner & Hennig, "Modular block-diagonal curvature
    approximations for feedforward architectures", AISTATS 2020, and its ``bpexts`` code,
    after Chen et al.'s BDA-PCH): a convex combination of the curvature block and the
    identity, so ``alpha = 0`` is a pure Newton step on the block and ``alpha = 1`` a gradient
    step. (A damping ``λ`` added as ``C + λI`` is ``alpha = λ / (1 + λ)`` with
    ``lr · (1 + λ)``.)

    CG starts at ``d = 0`` and stops when ``‖r‖ ≤ max(cg_tol · ‖g‖, cg_atol)``
    (``r = −g − A d``, ``A = (1 − α)C + αI``), after ``cg_maxiter`` iterations (default:
    ``P``), or when it meets non-positive curvature ``qᵀAq ≤ 0`` (possible for the Hessian): then it keeps
    the current ``d``, or takes ``d = −g`` if that happens in its first iteration (as
    Newton-CG does). All blocks run their CG side by side, so one CG iteration costs one call
    of the step; a step with ``k`` CG iterations calls it ``k + 1`` times (the first call
    gets the gradient).

    ``curvature`` picks the block and the product quantity the step must compute
    (``optimizer.quantity``): ``"ggn"`` → ``ggnmp``, ``"hessian"`` → ``hmp``,
    ``"pch_abs"`` → ``pchmp_abs``, ``"pch_clip"`` → ``pchmp_clip``. Usage::

        opt = CGNewton(model.named_parameters(), lr=0.1, alpha=0.02, cg_atol=0.0,
                       cg_tol=0.1, cg_maxiter=50, curvature="ggn")
        step = fxcurv.compile(model, loss_fn, [opt.quantity])
        for x, y in loader:
            loss = opt.step(lambda vectors: step(x, y, vectors))

    The closure maps ``vectors`` (``{name: [V, *p.shape]}`` for every trainable parameter of
    the model, so the optimizer must hold all of them) to the step's outputs
    ``(loss, grad, products, ...)``; ``products`` is the first requested quantity. After a
    step, ``opt.state[p]`` holds ``cg_iterations``, ``cg_residual`` (``‖r‖ / ‖g‖``) and
    ``cg_negative_curvature``.
    """

    def __init__(self, params, lr: float, alpha: float, cg_atol: float = 1e-8,
                 cg_tol: float = 1e-5, cg_maxiter: Optional[int] = None,
                 curvature: str = "ggn"):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}")
        if lr < 0 or cg_atol < 0 or cg_tol < 0:
            raise ValueError("lr, cg_atol and cg_tol must be >= 0")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1] (HBP's convex combination "
                             f"(1 - alpha) C + alpha I), got {alpha}")
        if cg_maxiter is not None and cg_maxiter < 0:
            raise ValueError(f"cg_maxiter must be >= 0 or None, got {cg_maxiter}")
        defaults = dict(lr=lr, alpha=alpha, cg_atol=cg_atol, cg_tol=cg_tol,
                        cg_maxiter=cg_maxiter)
        super().__init__(params, defaults)
        self.curvature = curvature
        self.quantity = CURVATURES[curvature]

    @torch.no_grad()
    def step(self, closure: Callable[[Vectors], Sequence[Any]]) -> Tensor:  # type: ignore[override]
        """One Newton-CG update of every parameter; returns the loss of the first call."""
        blocks = [(name, p, group) for group in self.param_groups
                  for name, p in _named_params(group, "CGNewton")]
        params = {name: p.detach() for name, p, _ in blocks}
        loss, grad, _ = _unpack(closure(_zero_vectors(params)))
        solvers = {name: _BlockCG(-grad[name].flatten(), group)
                   for name, p, group in blocks if name in grad}
        while any(not s.done for s in solvers.values()):
            vectors = _zero_vectors(params)
            for name, solver in solvers.items():
                if not solver.done:
                    vectors[name] = solver.direction().view_as(vectors[name])
            _, _, products = _unpack(closure(vectors))
            for name, solver in solvers.items():
                if not solver.done:
                    solver.advance(products[name].flatten())
        for name, p, group in blocks:
            if name in solvers:
                p.add_(solvers[name].x.view_as(p), alpha=group["lr"])
                self.state[p].update(solvers[name].info())
        return loss


def _unpack(outputs: Sequence[Any]) -> tuple[Tensor, dict, dict]:
    """``(loss, grad, products)`` from the step's outputs ``(loss, grad, products, ...)``."""
    if not isinstance(outputs, (tuple, list)) or len(outputs) < 3:
        raise TypeError("the CGNewton closure must return the step's outputs (loss, grad, "
                        "products, ...): compile the step with [optimizer.quantity] and return "
                        "step(x, y, vectors).")
    return outputs[0], outputs[1], outputs[2]


class _BlockCG:
    r"""CG for ``A d = b`` with ``A = (1 − α)C + αI``, one product ``C q`` per :meth:`advance`.

    Textbook CG from ``d = 0``: ``r = b``, ``q = r``; per iteration ``a = rᵀr / qᵀAq``,
    ``d += a q``, ``r −= a Aq``, ``q = r + (r_newᵀr_new / rᵀr) q``.
    """

    def __init__(self, b: Tensor, group: dict):
        self.b, self.alpha = b, group["alpha"]
        self.x = torch.zeros_like(b)
        self.r, self.q = b.clone(), b.clone()
        self.rs = self.r.dot(self.r).item()
        self.b_norm = math.sqrt(self.rs)
        self.bound = max(group["cg_tol"] * self.b_norm, group["cg_atol"])
        maxiter = group["cg_maxiter"]
        self.maxiter = b.numel() if maxiter is None else maxiter
        self.iterations, self.negative_curvature = 0, False
        self.done = self._stop()

    def _stop(self) -> bool:
        return math.sqrt(self.rs) <= self.bound or self.iterations >= self.maxiter

    def direction(self) -> Tensor:
        """The vector ``q`` whose product ``C q`` :meth:`advance` needs next."""
        return self.q

    def advance(self, cq: Tensor) -> None:
        """One CG iteration, given ``C q`` (``q`` from :meth:`direction`)."""
        aq = (1.0 - self.alpha) * cq + self.alpha * self.q
        curvature = self.q.dot(aq).item()
        if not curvature > 0:
            self.negative_curvature, self.done = True, True
            if self.iterations == 0:
                self.x = self.b.clone()
            return
        a = self.rs / curvature
        self.x.add_(self.q, alpha=a)
        self.r.sub_(aq, alpha=a)
        rs_new = self.r.dot(self.r).item()
        self.iterations += 1
        self.q = self.r + (rs_new / self.rs) * self.q
        self.rs = rs_new
        self.done = self._stop()

    def info(self) -> dict:
        residual = math.sqrt(self.rs) / self.b_norm if self.b_norm > 0 else 0.0
        return dict(cg_iterations=self.iterations, cg_residual=residual,
                    cg_negative_curvature=self.negative_curvature)


def _step_quantities(step: Any) -> list[str]:
    meta = getattr(step, "meta", {}).get("fxcurv")
    if meta is None:
        raise TypeError("expected a step returned by fxcurv.compile (a torch.fx.GraphModule); "
                        "a TorchScript-compiled step has no record of its quantities.")
    return list(meta["quantities"])


def _zero_vectors(params: Dict[str, Tensor]) -> Vectors:
    """One zero vector ``[1, *p.shape]`` per parameter, for a call made for the step's other
    outputs or parameters (the step needs at least one vector for every parameter)."""
    return {name: p.new_zeros((1, *p.shape)) for name, p in params.items()}


def attach(model: nn.Module, step: Any, x: Tensor, y: Tensor) -> Tensor:
    """Run ``step(x, y)`` and write its results onto ``model``'s parameters, BackPACK-style.

    For every trainable parameter ``p`` named ``n`` in ``model.named_parameters()``:

    - ``p.grad = grad[n]`` (overwritten, not accumulated: like ``zero_grad()`` + ``backward()``);
    - ``p.<q> = result[n]`` for every requested quantity ``q`` that is not a product, under its
      BackPACK name (``p.diag_ggn_mc``, ``p.kfac`` (a list), ...); per-sample gradients as both
      ``p.grad_batch`` (BackPACK's name) and ``p.batch_grad``;
    - ``p.hmp``, ``p.ggnmp``, ``p.pchmp_abs``, ``p.pchmp_clip`` (those requested): functions
      ``vec [V, *p.shape] -> [V, *p.shape]``, the product of ``p``'s curvature block with each
      vector. Each call runs the step again on this ``x, y`` (kept alive by the function) with
      ``vec`` for ``p`` and zeros for the other parameters.

    Returns the loss. Attributes from earlier calls stay until overwritten.
    """
    quantities = _step_quantities(step)
    parameters = dict(model.named_parameters())
    trainable = {n: p.detach() for n, p in parameters.items() if p.requires_grad}
    has_products = any(q in PRODUCTS for q in quantities)
    outputs = step(x, y, _zero_vectors(trainable)) if has_products else step(x, y)
    loss, grad, results = outputs[0], outputs[1], outputs[2:]
    for name, g in grad.items():
        parameters[name].grad = g
    for index, (quantity, result) in enumerate(zip(quantities, results)):
        for name, value in result.items():
            if quantity in PRODUCTS:
                value = _product_function(step, x, y, trainable, name, 2 + index)
            for attribute in ATTRIBUTE_NAMES.get(quantity, (quantity,)):
                setattr(parameters[name], attribute, value)
    return loss


def _product_function(step, x: Tensor, y: Tensor, params: Dict[str, Tensor], name: str,
                      index: int) -> Callable[[Tensor], Tensor]:
    def product(vec: Tensor) -> Tensor:
        """``[V, *p.shape]``: this parameter's curvature block times each vector."""
        vectors = _zero_vectors(params)
        vectors[name] = vec
        return step(x, y, vectors)[index][name]
    return product


def curvature_blocks(step: Any, x: Tensor, y: Tensor, quantity: Optional[str] = None,
                     chunk_size: int = 256) -> Dict[str, Tensor]:
    """Dense curvature blocks ``{name: [P, P]}`` (``P = p.numel()``), for small layers.

    ``step`` must compute a product quantity (``hmp``, ``ggnmp``, ``pchmp_abs``,
    ``pchmp_clip``); ``quantity`` says which when it computes several. Column ``j`` of a block
    is the product with the unit vector ``e_j``; the step is called with up to ``chunk_size``
    unit vectors per parameter at a time, ``ceil(max P / chunk_size)`` calls in all. Entry
    ``[i, j]`` is ``∂²L/∂p_i∂p_j`` (for ``hmp``) with ``p`` flattened in row-major order.
    """
    index = 2 + _product_index(_step_quantities(step), quantity)
    params = {n: step.get_parameter(n).detach() for n in step.meta["fxcurv"]["parameters"]}
    blocks = {n: p.new_zeros((p.numel(), p.numel())) for n, p in params.items()}
    for start in range(0, max(p.numel() for p in params.values()), chunk_size):
        vectors = _zero_vectors(params)
        active = [n for n, p in params.items() if start < p.numel()]
        for name in active:
            vectors[name] = _unit_vectors(params[name], start, chunk_size)
        result = step(x, y, vectors)[index]
        for name in active:
            columns = result[name].reshape(len(vectors[name]), -1).T
            blocks[name][:, start:start + columns.shape[1]] = columns
    return blocks


def _product_index(quantities: list[str], quantity: Optional[str]) -> int:
    """Position of the requested (or the only) product quantity among the step's quantities."""
    products = [q for q in quantities if q in PRODUCTS]
    if quantity is None and len(products) == 1:
        return quantities.index(products[0])
    if quantity is not None and quantity in products:
        return quantities.index(quantity)
    raise ValueError(f"the step computes the product quantities {products}; pass quantity= one "
                     "of them" if products else "the step computes no product quantity (hmp, "
                     "ggnmp, pchmp_abs, pchmp_clip); compile it with one.")


def _unit_vectors(p: Tensor, start: int, count: int) -> Tensor:
    """Unit vectors ``e_start, ..., e_{start+count-1}`` of ``p``'s flattened space,
    ``[V, *p.shape]`` (fewer at the end)."""
    eye = torch.eye(p.numel(), dtype=p.dtype, device=p.device)[start:start + count]
    return eye.reshape(-1, *p.shape)
