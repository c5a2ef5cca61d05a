"""First-order quantities from per-op parameter rules (BackPACK's shapes and scaling).

With ``g_n`` the gradient of the loss contributed by sample ``n`` (the 1/N of a mean reduction
included, so ``Σ_n g_n = grad``):

* ``batch_grad[p]``       ``[N, *p.shape]``  ``g_n``, summed over every use of ``p``;
* ``batch_l2[p]``         ``[N]``            ``‖g_n‖²``;
* ``sum_grad_squared[p]`` ``p.shape``        ``Σ_n g_n²``;
* ``variance[p]``         ``p.shape``        ``Σ_n g_n² / N - (Σ_n g_n / N)²``.

``batch_l2`` and ``sum_grad_squared`` of a parameter with one use take the op's cheaper formula
when it has one (a linear layer on 2-D input never builds ``[N, O, I]``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.errors import node_error
from fxcurv.rules import Ctx, OpRule, rule_for


def batch_zeros(p: Tensor, n: int) -> Tensor:
    """Per-sample gradients of a parameter that does not influence the loss."""
    return torch.zeros([n] + list(p.shape), dtype=p.dtype, device=p.device)


class FirstOrder:
    """Emits first-order quantities on demand, each intermediate at most once per parameter."""

    def __init__(self, emit: Emitter, params: dict[str, fx.Node], cotangents: dict,
                 batch_size: Any, grads: dict[str, Any]):
        self.emit, self.params, self.cotangents = emit, params, cotangents
        self.batch_size, self.grads = batch_size, grads
        self._memo: dict[tuple[str, str], Any] = {}

    def uses(self, name: str) -> list[tuple[fx.Node, OpRule, str]]:
        """``(op node, rule, argument name)`` for every use of a parameter the loss sees."""
        param = self.params[name]
        found = []
        for user in param.users:
            if user not in self.cotangents:
                continue
            rule = rule_for(user)
            for arg, value in rule.bind(user).items():
                if value is param or (isinstance(value, (list, tuple)) and param in value):
                    found.append((user, rule, arg))
        return found

    def _memoized(self, kind: str, name: str, build) -> Any:
        key = (kind, name)
        if key not in self._memo:
            label = f"{self.params[name].name}_{kind}"
            with self.emit.naming(label, pass_="per_sample", param=name):
                value = build()
            self.emit.rename(value, label)
            self._memo[key] = value
        return self._memo[key]

    def _from_uses(self, name: str, kind: str) -> list:
        contributions = []
        for node, rule, arg in self.uses(name):
            fn = getattr(rule, kind).get(arg)
            if fn is None:
                raise node_error(node, f"{rule.name} has no per-sample rule for parameter "
                                 f"'{name}' (its argument '{arg}')",
                                 "Use a supported layer for this parameter or request "
                                 "only 'grad'.", "batch_grad")
            contributions.append(fn(self.cotangents[node], Ctx.of(node, rule, self.emit)))
        return contributions

    def batch_grad(self, name: str) -> Any:
        def build():
            parts = self._from_uses(name, "batch_grad")
            if not parts:
                return self.emit.call(batch_zeros, self.emit.proxy(self.params[name]),
                                      self.batch_size)
            return _sum(parts)
        return self._memoized("batch_grad", name, build)

    def _shortcut(self, name: str, kind: str) -> Optional[Any]:
        """The op's cheaper formula, when the parameter has exactly one use that has one."""
        uses = self.uses(name)
        if len(uses) == 1 and uses[0][2] in getattr(uses[0][1], kind):
            return self._from_uses(name, kind)[0]
        return None

    def batch_l2(self, name: str) -> Any:
        def build():
            quick = self._shortcut(name, "batch_l2")
            if quick is not None:
                return quick
            return self.batch_grad(name).square().flatten(1).sum(1)
        return self._memoized("batch_l2", name, build)

    def sum_grad_squared(self, name: str) -> Any:
        def build():
            quick = self._shortcut(name, "sum_grad_squared")
            if quick is not None:
                return quick
            return self.batch_grad(name).square().sum(0)
        return self._memoized("sum_grad_squared", name, build)

    def variance(self, name: str) -> Any:
        def build():
            mean_square = self.sum_grad_squared(name) / self.batch_size
            return mean_square - (self.grads[name] / self.batch_size).square()
        return self._memoized("variance", name, build)


def _sum(parts: list) -> Any:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total

