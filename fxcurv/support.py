"""``python -m fxcurv.support``: the support matrix (ops x quantities), read off the rule table.

The README's support section is this command's output; ``tests/test_support.py`` keeps the
two in sync.
"""
from __future__ import annotations

from tabulate import tabulate

from .quantities import QUANTITIES
from .rules import RULES, OpRule

_MODULE_ALIASES = {"torch.nn.functional": "F", "torch._C._nn": "F", "torch._C._VariableFunctions":
                   "torch", "_operator": "operator", "builtins": ""}


def spelling(target) -> str:
    """How a user writes the op: ``F.relu``, ``torch.cat``, ``Tensor.view``, ``operator.add``."""
    if isinstance(target, str):
        return f"Tensor.{target}"
    module = getattr(target, "__module__", None) or "torch"
    prefix = _MODULE_ALIASES.get(module, module)
    name = getattr(target, "__name__", str(target))
    return f"{prefix}.{name}" if prefix else name


def _first_order(rule: OpRule) -> str:
    """Per-sample quantities (first order and the GGN family) through this op."""
    if rule.batch_grad:
        return "yes (parameters: " + ", ".join(rule.batch_grad) + ")"
    return "yes"


def _second_order(rule: OpRule) -> str:
    """How the op enters diag_h / hmp / pchmp: affine, an elementwise residual, a dense
    residual block, or not."""
    if rule.sqrt_hessian is not None:
        return "yes (loss Hessian square root)"
    if rule.residual:
        return "yes (residual: " + ", ".join(rule.residual) + ")"
    if any(len(key) > 1 for key in rule.residual_block):
        return "yes (cross block of operands)"
    if rule.residual_block:
        return "yes (residual block: " + ", ".join(
            name for key in rule.residual_block for name in key) + ")"
    zero = rule.hessian_is_zero
    if zero is True:
        return "yes (affine)"
    if callable(zero):
        return "yes (affine in eval mode)"
    if isinstance(zero, tuple) and zero:
        return "only through " + ", ".join(zero)
    return "—"


def rows() -> list[list[str]]:
    """One row per rule: op, spellings, grad, per-sample/GGN, Hessian, Kronecker, notes."""
    by_rule: dict[int, tuple[OpRule, list[str]]] = {}
    for target, rule in RULES.items():
        if getattr(target, "__module__", "").startswith("fxcurv"):
            continue  # internal call-time checks
        by_rule.setdefault(id(rule), (rule, []))[1].append(spelling(target))
    table = []
    for rule, names in sorted(by_rule.values(), key=lambda item: item[0].name):
        if rule.constant is True:
            cells = ["no derivative"] * 4
        elif rule.lower is not None:
            cells = ["lowered to other ops"] * 4
        else:
            cells = ["yes" if rule.vjp else "—", _first_order(rule), _second_order(rule),
                     ", ".join(rule.kron) if rule.kron else "—"]
        notes = "mixes samples in some settings" if rule.mixes_samples else ""
        table.append([rule.name, ", ".join(sorted(set(names))), *cells, notes])
    return table


def quantity_rows() -> list[list[str]]:
    return [[q.name, q.family, "yes" if q.implemented else "not yet", q.doc]
            for q in QUANTITIES.values()]


def render() -> str:
    ops = tabulate(rows(), headers=["op", "spellings", "grad", "first order, GGN family",
                                    "diag_h, hmp, pchmp", "kfac, kflr", "notes"],
                   tablefmt="github")
    quantities = tabulate(quantity_rows(), headers=["quantity", "family", "implemented",
                                                    "what"], tablefmt="github")
    return f"### Quantities\n\n{quantities}\n\n### Ops\n\n{ops}\n"


BEGIN, END = "<!-- support:begin -->", "<!-- support:end -->"


def update_readme(path: str = "README.md") -> None:
    """Replace the README's support section (between the markers) with :func:`render`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{render()}{END}{tail}")


if __name__ == "__main__":
    import sys

    if "--update-readme" in sys.argv:
        update_readme()
    else:
        print(render())
