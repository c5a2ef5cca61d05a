"""``python -m fxcurv.support``: the support matrix (ops x quantities), read off the rule table.

``docs/support.md`` and the README's quantity list are this module's output
(``python -m fxcurv.support --update`` rewrites both); ``tests/test_support.py`` keeps them
in sync with the rule table.
"""
from __future__ import annotations

from pathlib import Path

from .bench.report import render as markdown_table
from .quantities import QUANTITIES
from .rules import COUPLES_ROWS, RULES, OpRule

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
    if rule.has_sqrt_hessian:
        return "yes (loss Hessian square root)"
    if rule.residual:
        return "yes (residual: " + ", ".join(rule.residual) + ")"
    if any(len(key) > 1 for key in rule.residual_block):
        return "yes (cross block of operands)"
    if rule.residual_block:
        return "yes (residual block: " + ", ".join(
            name for key in rule.residual_block for name in key) + ")"
    zero = rule.hessian_is_zero
    if zero is True and rule.bilinear and not rule.cross:
        return "yes (affine; cross terms of " + ", ".join(
            "·".join(pair) for pair in rule.bilinear[:1]) + ")"
    if zero is True:
        return "yes (affine)"
    if callable(zero):
        return "yes (affine in eval mode)"
    if isinstance(zero, tuple) and zero:
        return "only through " + ", ".join(zero)
    return "—"


def _kronecker(rule: OpRule) -> str:
    """Parameters with Kronecker factors, and those that get their GGN block ``[G]``."""
    blocks = [name for name in rule.batch_grad if name not in rule.kron]
    cells = [", ".join(rule.kron)] if rule.kron else []
    if blocks:
        cells.append("GGN block: " + ", ".join(blocks))
    return "; ".join(cells) or "—"


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
        elif rule.lower is not None and not rule.vjp:
            cells = ["lowered to other ops"] * 4
        else:
            cells = ["yes" if rule.vjp else "—", _first_order(rule), _second_order(rule),
                     _kronecker(rule)]
        notes = "mixes samples in some settings" if rule.mixes_samples else ""
        if rule.has(COUPLES_ROWS):
            notes += " (GGN quantities on the batch as one sample)"
        table.append([rule.name, ", ".join(sorted(set(names))), *cells, notes])
    return table


# ops without a rule that PyTorch's decompositions (passes/expand.py) bring to ruled ops;
# checked when the table is rendered, so a row is only shown while the decomposition works
DECOMPOSED = ("torch.nn.functional.mish", "torch.nn.functional.hardshrink", "torch.logit")


def _one_argument(fn):
    return lambda x: fn(x)


def decomposed_rows() -> list[list[str]]:
    """One row per op in ``DECOMPOSED`` whose one-argument call expands to ruled ops only."""
    import importlib  # noqa: PLC0415

    from .passes.expand import expand  # noqa: PLC0415
    from .rules import rule_for  # noqa: PLC0415
    from .trace import CurvatureTracer  # noqa: PLC0415

    table = []
    for path in DECOMPOSED:
        module, name = path.rsplit(".", 1)
        fn = getattr(importlib.import_module(module), name)
        graph = expand(CurvatureTracer().trace(_one_argument(fn)))
        calls = [n for n in graph.nodes if n.op in ("call_function", "call_method")]
        if calls and all(rule_for(n) is not None for n in calls):
            into = ", ".join(sorted({rule_for(n).name for n in calls}))
            table.append([name, spelling(fn), *["via decomposition"] * 4,
                          f"PyTorch's decomposition: {into}"])
    return table


def module_rows() -> list[list[str]]:
    """Modules that tracing rewrites (everything else is traced through its ``forward``)."""
    from .recurrent import CELL_NOTE, CELLS, RECURRENT, SUPPORT_NOTE  # noqa: PLC0415
    from .trace import MODULE_LOWERINGS, backpack_lowerings  # noqa: PLC0415

    table = [[f"nn.{cls.__name__}", "unrolled over `sequence_length` steps", SUPPORT_NOTE]
             for cls in RECURRENT]
    table += [[f"nn.{cls.__name__}", "lowered to one step of ops", CELL_NOTE] for cls in CELLS]
    for cls, lowering in {**MODULE_LOWERINGS, **backpack_lowerings(load=True)}.items():
        summary = (lowering.__doc__ or "").strip().split(".")[0].replace("\n", " ")
        table.append([f"nn.{cls.__name__}", "lowered to functional ops", " ".join(
            summary.split())])
    return table


def quantity_rows() -> list[list[str]]:
    return [[q.name, q.family, q.doc] for q in QUANTITIES.values()]


def render() -> str:
    """The quantity table, the module table and the op table, as Markdown."""
    ops = markdown_table(["op", "spellings", "grad", "first order, GGN family",
                          "diag_h, hmp, pchmp", "kfac, kflr", "notes"],
                         rows() + decomposed_rows())
    quantities = markdown_table(["quantity", "family", "what"], quantity_rows())
    modules = markdown_table(["module", "traced as", "notes"], module_rows())
    return (f"## Quantities\n\n{quantities}\n\n## Modules\n\n{modules}\n\n"
            f"## Ops\n\n{ops}\n")


def page() -> str:
    """``docs/support.md``: a title, how to read the tables, and :func:`render`."""
    return ("# Support\n\nGenerated by `python -m fxcurv.support --update` from the rule table "
            "(`fxcurv/rules/`); `tests/test_support.py` fails when this page is stale. "
            "An op or a quantity that is not listed raises `fxcurv.CompileError` at compile "
            "time. \"mixes samples in some settings\": per-sample quantities through the op "
            "are refused where it mixes the batch axis; \"lowered to other ops\": the op is "
            "rewritten into listed ops first.\n\n" + render())


def quantity_list() -> str:
    """The README's quantity list: name and meaning of every quantity."""
    lines = [[f"`{q.name}`", q.doc] for q in QUANTITIES.values()]
    return markdown_table(["quantity", "what (shapes: `p` a parameter, N samples)"], lines) + "\n"


BEGIN, END = "<!-- quantities:begin -->", "<!-- quantities:end -->"
ROOT = Path(__file__).resolve().parents[1]


def between_markers(text: str) -> str:
    """The part of ``text`` between :data:`BEGIN` and :data:`END`."""
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


def update(root: Path = ROOT) -> None:
    """Rewrite ``docs/support.md`` and the README's quantity list from the rule table."""
    (root / "docs" / "support.md").write_text(page(), encoding="utf-8")
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    old = between_markers(text)
    readme.write_text(text.replace(BEGIN + old + END, f"{BEGIN}\n{quantity_list()}{END}"),
                      encoding="utf-8")


if __name__ == "__main__":
    import sys

    if {"--update", "--update-readme"} & set(sys.argv[1:]):
        update()
    else:
        print(page())
