"""One generic float64 test over the whole rule table (cases in ``rule_cases.py``).

For every case and 0, 1 or 2 leading vector axes: the emitted Jacobian-transpose products
equal ``torch.func.vjp``; the per-sample parameter rules equal per-sample autograd gradients;
the adjoint identity ``⟨ct, J v⟩ = ⟨Jᵀ ct, v⟩`` holds against ``torch.func.jvp``; and the
generated code compiles with TorchScript. Where a GPU is available, the Jacobian-transpose
and per-sample rules also run on CUDA (``-m cuda``; skipped without one).
"""
from __future__ import annotations

import operator

import pytest
import torch

from fxcurv.rules import (AFFINE, CONCATENATION, ELEMENTWISE, FIRST_ORDER, FRESH, MONOTONE,
                          PERMUTATION, REDUCTION, RULES, WINDOW_MAX)
from fxcurv.rules.helpers import block_diagonal
from rule_cases import CASES
from rule_harness import (build, cotangent, reference_batch_grads, reference_diagonal_curvature,
                          reference_vjps)

IDS = [c.id for c in CASES]


def _close(actual, expected, what):
    assert actual is not None, f"{what}: no cotangent was emitted"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=what)


@pytest.mark.parametrize("lead", [0, 1, 2])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vjp_and_batch_rules(case, lead):
    module, _, _ = build(case, lead)
    ct = cotangent(case, lead, torch.Generator().manual_seed(lead))
    vjps, batch, shortcuts = module(ct, *case.inputs)
    for name, actual, expected in zip(case.differentiable(), vjps,
                                      reference_vjps(case, ct, lead)):
        _close(actual, expected, f"vjp wrt {name}")
    references = reference_batch_grads(case, ct, lead)
    for name, actual, expected, quick in zip(case.params, batch, references, shortcuts):
        _close(actual, expected, f"per-sample grad of {name}")
        if "sum_squares" in quick:
            _close(quick["sum_squares"], expected.square().sum(list(range(lead + 1))),
                   f"sum_grad_squared of {name} from its contraction")
        if "batch_l2" in quick:
            _close(quick["batch_l2"], expected.square().flatten(1).sum(1), f"batch_l2 of {name}")
        if "diagonal_vectors" in quick:  # OpRule.diagonal_squares
            reference = reference_diagonal_curvature(case, ct, name, quick["diagonal_vectors"])
            for kind, value in reference.items():
                _close(quick[kind], value, f"{kind} of {name} (diagonal_squares)")


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vjp_and_batch_rules_on_cuda(case, cuda_device):
    """The emitted rules run on CUDA (float64, 0-2 leading axes) and equal the references."""
    inputs = [_to(t, cuda_device) for t in case.inputs]
    for lead in (0, 1, 2):
        module, _, _ = build(case, lead)
        ct = cotangent(case, lead, torch.Generator().manual_seed(lead))
        vjps, batch, _ = module(ct.to(cuda_device), *inputs)
        for name, actual, expected in zip(case.differentiable(), vjps,
                                          reference_vjps(case, ct, lead)):
            assert actual is None or actual.device.type == cuda_device.type, \
                f"vjp wrt {name}: on {actual.device}"
            _close(_to(actual, "cpu"), expected, f"vjp wrt {name}, lead {lead}, CUDA")
        for name, actual, expected in zip(case.params, batch,
                                          reference_batch_grads(case, ct, lead)):
            _close(_to(actual, "cpu"), expected, f"per-sample grad of {name}, lead {lead}, CUDA")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adjoint_identity_and_torchscript(case):
    module, _, _ = build(case, 0)
    ct = cotangent(case, 0, torch.Generator().manual_seed(7))
    vjps, _, _ = torch.jit.script(module)(ct, *case.inputs)
    partial, values = case.of_differentiable()
    tangents = [torch.randn_like(v) for v in values]
    jv = _jvp(partial, values, tangents)
    lhs = (ct * jv).sum()
    rhs = sum((v * t).sum() for v, t in zip(vjps, tangents))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


def _jvp(fn, values: list, tangents: list):
    """``J t`` by forward AD, or, for ops torch has no forward AD for (``_embedding_bag``,
    ``_weight_norm_interface``), from the Jacobian built row by row in reverse mode."""
    try:
        return torch.func.jvp(fn, tuple(values), tuple(tangents))[1]
    except (NotImplementedError, RuntimeError) as error:
        if "forward" not in str(error):
            raise
    jacobians = torch.autograd.functional.jacobian(fn, tuple(values))
    return sum(torch.tensordot(j, t, dims=t.dim()) for j, t in zip(jacobians, tangents))


def test_every_rule_has_a_case():
    """A rule is tested by registering it and adding a case: none may be left without one."""
    covered = set()
    for case in CASES:
        _, used, _ = build(case, 0)
        covered.update(id(rule) for rule in used)
        covered.update(id(RULES[key]) for key in case_lowered_rules(case))
    missing = sorted({rule.name for rule in RULES.values()
                      if id(rule) not in covered and not rule.constant
                      and rule.name not in TESTED_ELSEWHERE})
    assert not missing, f"rules without a test case: {missing}"


# rules torch.func cannot serve as reference for, with the test that checks them instead
TESTED_ELSEWHERE = {
    "rrelu": "test_compile.py::test_rrelu_uses_the_mean_slope_in_eval_and_one_draw_per_call_"
             "in_train_mode (vmap has no batching rule for rrelu_with_noise)",
}


def case_lowered_rules(case):
    """Rules applied by lowering (they leave no node behind), found by tracing."""
    from fxcurv.trace import CurvatureTracer
    graph = CurvatureTracer().trace(case.fn)
    keys = []
    for node in graph.nodes:
        try:
            rule = RULES.get(node.target)
        except TypeError:
            rule = None
        if rule is not None and rule.lower is not None:
            keys.append(node.target)
    return keys


def _single_op(case):
    """The one op node of a case whose arguments are the case's inputs (else None); a piece
    taken from its tuple result (``torch.max(x, 1).values``, ``split(x)[1]``) is part of it."""
    from fxcurv.passes.normalize import normalize
    from fxcurv.rules import rule_for
    from fxcurv.trace import CurvatureTracer
    graph = CurvatureTracer().trace(case.fn)
    normalize(graph)
    ops = [n for n in graph.nodes if n.op in ("call_function", "call_method")
           and rule_for(n) is not None and not rule_for(n).is_constant(n)
           and not _piece_of_op(n)]
    return (ops[0], rule_for(ops[0])) if len(ops) == 1 else (None, None)


def _piece_of_op(node) -> bool:
    """``node`` is ``op(...)[k]`` with ``op`` a ruled call returning a tuple."""
    from fxcurv.rules import rule_for
    source = node.args[0] if node.target is operator.getitem and node.args else None
    return getattr(source, "op", None) in ("call_function", "call_method") and \
        rule_for(source) is not None and isinstance(node.args[1], int)


def test_every_rule_that_states_a_second_order_is_checked():
    """Each differentiable op with second-order claims has a case where it is the only op
    (so ``test_second_order_rules`` checks them), internal call-time checks aside."""
    checked = set()
    for case in CASES:
        _, rule = _single_op(case)
        if rule is not None:
            checked.add(rule.name)
    stated = {r.name for target, r in RULES.items() if r.vjp and not r.constant
              and r.loss is None and not getattr(target, "__module__", "").startswith("fxcurv")}
    assert not stated - checked, sorted(stated - checked)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_second_order_rules(case):
    """``hessian_is_zero`` claims hold, ``residual`` equals the diagonal of the Hessian of
    ``⟨g, f⟩`` w.r.t. the argument (which must then be diagonal), and ``residual_block[(a,)]``
    its per-sample blocks (zero between samples), by ``torch.func.hessian``."""
    node, rule = _single_op(case)
    if node is None or rule.loss is not None:
        pytest.skip("not a single non-loss op")
    bound = rule.bind(node)
    out = case.fn(*case.inputs)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    for arg, value in bound.items():
        if getattr(value, "op", None) != "placeholder" or value.target not in case.differentiable():
            continue
        if sum(v is value for v in bound.values()) > 1:
            continue  # x * x: the same input in two arguments (cross terms)
        index = case.names.index(value.target)

        def pairing(t):
            args = list(case.inputs)
            args[index] = t
            return (case.fn(*args) * g).sum()

        x = case.inputs[index]
        hessian = _hessian(pairing, x).reshape(x.numel(), x.numel())
        if rule.zero_hessian(arg, bound):
            torch.testing.assert_close(hessian, torch.zeros_like(hessian), atol=1e-10, rtol=0)
        elif arg in rule.residual:
            torch.testing.assert_close(hessian, torch.diag(hessian.diagonal()), atol=1e-10,
                                       rtol=0, msg="the residual rule needs a diagonal Hessian")
            actual = _run_rule(case, rule.residual[arg], g)
            torch.testing.assert_close(actual.reshape(-1), hessian.diagonal(), rtol=1e-10,
                                       atol=1e-12)
        elif (arg,) in rule.residual_block:
            samples, size = x.size(0), x[0].numel()
            blocks = hessian.reshape(samples, size, samples, size)
            within = torch.stack([blocks[n, :, n] for n in range(samples)])
            torch.testing.assert_close(blocks.abs().sum(2) - within.abs(),
                                       torch.zeros_like(within),
                                       atol=1e-10, rtol=0, msg="the block mixes samples")
            actual = block_diagonal(_run_rule(case, rule.residual_block[(arg,)], g))
            torch.testing.assert_close(actual, within, rtol=1e-10, atol=1e-12)
        elif not (rule.mixes_samples and rule.mixes_samples(bound)):
            pytest.fail(f"{rule.name} states no second derivative for '{arg}'")


def _run_rule(case, fn, g):
    """``fn(g, ctx)`` of the case's single op, emitted into a fresh trace and run."""
    from fxcurv.emit import Emitter
    from fxcurv.rules import Ctx
    node, rule = _single_op(case)
    graph = node.graph
    with graph.inserting_before(next(iter(graph.nodes))):
        g_node = graph.placeholder("g_out")
    emit = Emitter(graph)
    value = fn(emit.proxy(g_node), Ctx.of(node, rule, emit))
    next(n for n in graph.nodes if n.op == "output").args = (emit.as_node(value),)
    graph._co_fields = {}
    return torch.fx.GraphModule(torch.nn.Module(), graph)(g, *case.inputs)


def _hessian(fn, x):
    """``torch.func.hessian`` (forward over reverse), or reverse over reverse for ops whose
    backward has no forward-mode derivative, or central differences of the gradient where
    torch has no second derivative at all (``hardsigmoid_backward``: piecewise linear, so
    the differences are exact away from its two kinks)."""
    try:
        return torch.func.hessian(fn)(x)
    except NotImplementedError:
        pass
    try:
        return torch.func.jacrev(torch.func.jacrev(fn))(x)
    except RuntimeError:
        grad, step = torch.func.grad(fn), 1e-6
        basis = torch.eye(x.numel(), dtype=x.dtype).reshape(x.numel(), *x.shape)
        rows = [(grad(x + step * e) - grad(x - step * e)) / (2 * step) for e in basis]
        return torch.stack(rows).reshape(*x.shape, *x.shape)


def test_every_rule_states_its_second_order():
    """Each differentiable op says how it enters second-order quantities: affine (zero
    Hessian), an elementwise residual, a dense residual block, or a loss's own factors; or it
    declares that it has first-order rules only (``FIRST_ORDER``: refused by any step that
    requests a quantity, ``test_recurrent.py``)."""
    missing = sorted({r.name for r in RULES.values() if r.vjp and not r.constant
                      and not r.has(AFFINE) and r.hessian_is_zero is False and not r.residual
                      and not r.residual_block and r.loss is None
                      and not r.has(FIRST_ORDER)})
    assert not missing, f"rules that do not state their second order: {missing}"


def _traits(case) -> frozenset:
    _, rule = _single_op(case)
    return frozenset() if rule is None else rule.traits & CHECKED_TRAITS


CHECKED_TRAITS = frozenset({ELEMENTWISE, AFFINE, PERMUTATION, MONOTONE, FRESH, WINDOW_MAX,
                            CONCATENATION, REDUCTION})
TRAIT_CASES = [c for c in CASES if _traits(c)]


@pytest.mark.parametrize("case", TRAIT_CASES, ids=[c.id for c in TRAIT_CASES])
def test_traits_hold(case):
    """What a rule's traits claim, on its cases (``torch.func``): ``ELEMENTWISE``: the
    Jacobian in each argument shaped like the output is diagonal; ``AFFINE``: ``⟨g, f⟩`` has
    a zero Hessian in all differentiable arguments jointly; ``PERMUTATION``: the Jacobian is a
    0/1 selection (at most one 1 per output entry); ``MONOTONE``: ``f`` is non-decreasing;
    ``FRESH``: the output shares no memory with the inputs; ``WINDOW_MAX``: every output
    entry is an input entry; ``CONCATENATION``: the output has the entries of its pieces;
    ``REDUCTION``: each input entry enters one output entry, with a non-negative weight."""
    traits = _traits(case)
    f, values = case.of_differentiable()
    out = f(*values)
    jacobians = torch.func.jacrev(f, argnums=tuple(range(len(values))))(*values)
    for x, jac in zip(values, jacobians):
        jac = jac.reshape(out.numel(), x.numel())
        if ELEMENTWISE in traits and x.shape == out.shape:
            torch.testing.assert_close(jac, torch.diag(jac.diagonal()), atol=0, rtol=0)
        if PERMUTATION in traits:
            assert bool(((jac == 0) | (jac == 1)).all()) and bool((jac.sum(1) <= 1).all())
        if REDUCTION in traits:
            assert bool((jac >= 0).all()) and bool(((jac > 0).sum(0) <= 1).all())
    if FRESH in traits:
        memory = {t.untyped_storage().data_ptr() for t in case.inputs
                  if isinstance(t, torch.Tensor)}
        assert case.fn(*case.inputs).untyped_storage().data_ptr() not in memory
    if WINDOW_MAX in traits:
        assert bool(torch.isin(out, values[0]).all())
    if CONCATENATION in traits:
        node, rule = _single_op(case)
        pieces = next(v for v in rule.bind(node).values() if isinstance(v, (list, tuple)))
        sizes = {n.target: t.numel() for n, t in zip(
            [n for n in node.graph.nodes if n.op == "placeholder"], case.inputs)}
        assert out.numel() == sum(sizes[p.target] if hasattr(p, "target") else 0
                                  for p in pieces)
    if MONOTONE in traits:
        x = torch.linspace(-8.0, 8.0, 401, dtype=torch.float64)
        y = f(x)
        assert bool((y[1:] >= y[:-1]).all())
    if AFFINE in traits:
        g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
        flat = torch.cat([v.reshape(-1) for v in values])
        sizes = [v.numel() for v in values]

        def pairing(t):
            parts = [p.reshape(v.shape) for p, v in zip(torch.split(t, sizes), values)]
            return (f(*parts) * g).sum()

        hessian = _hessian(pairing, flat)
        torch.testing.assert_close(hessian, torch.zeros_like(hessian), atol=1e-10, rtol=0)


def _has_cross_rule(case) -> bool:
    _, rule = _single_op(case)
    return rule is not None and bool(rule.cross)


CROSS_CASES = [c for c in CASES if _has_cross_rule(c)]


@pytest.mark.parametrize("case", CROSS_CASES, ids=[c.id for c in CROSS_CASES])
def test_cross_second_order_rules(case):
    """``cross[(a, b)]`` equals the diagonal of the mixed Hessian block of ``⟨g, f⟩``, which
    must be diagonal (elementwise ops with same-shaped arguments)."""
    node, rule = _single_op(case)
    bound = rule.bind(node)
    for (name_a, name_b), fn in rule.cross.items():
        a, b = bound[name_a], bound[name_b]
        if getattr(a, "op", None) != "placeholder" or getattr(b, "op", None) != "placeholder" \
                or a is b:
            continue
        ia, ib = case.names.index(a.target), case.names.index(b.target)
        if case.inputs[ia].shape != case.inputs[ib].shape:
            continue
        out = case.fn(*case.inputs)
        g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))

        def pairing(ta, tb):
            args = list(case.inputs)
            args[ia], args[ib] = ta, tb
            return (case.fn(*args) * g).sum()

        mixed = torch.func.hessian(pairing, argnums=(0, 1))(case.inputs[ia], case.inputs[ib])
        block = mixed[0][1].reshape(out.numel(), out.numel())
        torch.testing.assert_close(block, torch.diag(block.diagonal()), atol=1e-10, rtol=0)
        actual = _run_rule(case, fn, g)
        torch.testing.assert_close(actual.reshape(-1), block.diagonal(), rtol=1e-10, atol=1e-12)
