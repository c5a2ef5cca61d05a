"""Generic per-rule checks of the rule fields ``test_rules.py`` does not cover, each over
every rule case (``rule_cases.py``) whose op declares the field, in float64:

* ``kron``: with one sample, the Kronecker product of the factors equals the parameter's
  GGN block ``Σ_c q_c q_cᵀ`` (``q_c`` the per-sample gradient for the factor's column ``c``,
  by autograd) wherever that block is a Kronecker product (one position: every ``q_c`` shares
  one of the two factors' vectors); the factors are symmetric positive semi-definite and
  their product has the block's size everywhere. A coverage test asks every ``kron`` entry
  for at least one such exact case (cases with one output position below).
* ``kron_matrix``: from the dense curvature ``M = Σ_c vec(g_c) vec(g_c)ᵀ`` of one sample,
  the same factors as ``kron`` from the factor ``g``.
* ``loss``: ``Σ_c S_c S_cᵀ`` of ``sqrt_hessian`` (and ``sqrt_hessian_low_rank``) is the loss
  Hessian w.r.t. its input, the sampled ``sqrt_hessian_mc`` averages to it,
  ``mean_divisor(c, "gradient")`` turns the mean into the sum, ``check_target`` returns a
  valid target unchanged.
* ``jvp``: ``J_arg t`` for a tangent with a leading axis, against ``torch.func.jvp``.
* ``samples``: ``REDUCED`` outputs are 0-dim; ``KEPT`` outputs keep the data's sample axis 0
  and sample ``n`` of the output depends on sample ``n`` of the data only.
* ``signed_squares``: ``base + Σ_k Σ_l w_k[l, n] q_{k,l,n}²`` (summed over ``n``, or per
  sample) for several weighted factors, minus a diagonal curvature's share
  (``Σ_d r_d (∂y_d/∂w)²``, the optional ``diagonal`` formula), against autograd's per-sample
  gradients and the Jacobian.
* ``mixes_samples``: an op that gives no reason keeps the samples of its data apart.
* ``stack_uses``: two calls on one parameter act like one call on their data concatenated
  along positions (Jacobian-transpose and per-sample term).
* ``bilinear`` and the second-order walk (``passes/curvature/second_order.py``): a pair it
  classifies as having no cross term has none; a listed bilinear pair has one.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxcurv.emit import Emitter
from fxcurv.errors import CompileError
from fxcurv.passes.normalize import normalize
from fxcurv.rules import KEPT, REDUCED, Ctx, rule_for
from fxcurv.trace import CurvatureTracer
from rule_cases import CASES
from rule_harness import Case, case, reference_batch_grads, reference_diagonal_curvature

gen = torch.Generator().manual_seed(23)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=gen)


WB = ("w", "b")
# one output position: the Kronecker factors of these are the exact GGN block of one sample
ONE_POSITION = [
    case("conv1d_one_position", lambda x, w, b: F.conv1d(x, w, b), rand(2, 3, 3),
         rand(4, 3, 3), rand(4), params=WB),
    case("conv2d_one_position", lambda x, w, b: F.conv2d(x, w, b), rand(2, 3, 3, 2),
         rand(4, 3, 3, 2), rand(4), params=WB),
    case("conv3d_one_position", lambda x, w, b: F.conv3d(x, w, b), rand(2, 2, 2, 2, 2),
         rand(3, 2, 2, 2, 2), rand(3), params=WB),
    case("conv_transpose1d_one_position", lambda x, w, b: F.conv_transpose1d(x, w, b),
         rand(2, 3, 1), rand(3, 4, 1), rand(4), params=WB),
    case("conv_transpose2d_one_position", lambda x, w, b: F.conv_transpose2d(x, w, b),
         rand(2, 3, 1, 1), rand(3, 4, 1, 1), rand(4), params=WB),
    case("conv_transpose3d_one_position", lambda x, w, b: F.conv_transpose3d(x, w, b),
         rand(2, 2, 1, 1, 1), rand(2, 3, 1, 1, 1), rand(3), params=WB),
]


# -- harness -----------------------------------------------------------------------------------
def _single_op(c: Case):
    """``(graph, node, rule)`` of a case with one differentiable op, else None."""
    graph = CurvatureTracer().trace(c.fn)
    normalize(graph)
    ops = [n for n in graph.nodes if n.op in ("call_function", "call_method")
           and rule_for(n) is not None and not rule_for(n).is_constant(n)
           and not getattr(n.target, "__module__", "").startswith("fxcurv")]  # checks
    return (graph, ops[0], rule_for(ops[0])) if len(ops) == 1 else None


def _run(c: Case, emit_fn, *extra):
    """Run ``emit_fn(emit, node, rule, *extra proxies)`` on the case's single op; the
    ``extra`` tensors are inputs before the case's own."""
    graph, node, rule = _single_op(c)
    with graph.inserting_before(next(iter(graph.nodes))):
        holders = [graph.placeholder(f"extra_{i}") for i in range(len(extra))]
    emit = Emitter(graph)
    value = emit_fn(emit, node, rule, *[emit.proxy(h) for h in holders])
    next(n for n in graph.nodes if n.op == "output").args = (emit.as_node(value),)
    graph._co_fields = {}
    return fx.GraphModule(torch.nn.Module(), graph)(*extra, *c.inputs)


def _input_args(c: Case, field: str, names) -> list:
    """``(argument, input name)`` for each case input in ``names`` that the single op reads
    in an argument its rule's ``field`` has an entry for."""
    found = _single_op(c)
    if found is None:
        return []
    _, node, rule = found
    return [(arg, value.target) for arg, value in rule.bind(node).items()
            if getattr(value, "op", None) == "placeholder" and value.target in names
            and arg in getattr(rule, field)]


def _first_sample(c: Case, copies: int = 1) -> Case:
    """The case with every data input cut to its first sample, repeated ``copies`` times."""
    inputs = [t if n in c.params or not isinstance(t, torch.Tensor) or t.dim() == 0 else
              t[:1].repeat(copies, *[1] * (t.dim() - 1)) for n, t in zip(c.names, c.inputs)]
    return case(f"{c.id}_one", c.fn, *inputs, params=c.params, const=c.const)


def _with(field: str, cases=CASES) -> list:
    """``(case, argument, parameter)`` for the cases whose op has ``field[argument]``."""
    return [(c, arg, name) for c in cases for arg, name in _input_args(c, field, c.params)]


# -- kron ----------------------------------------------------------------------------------------
KRON = _with("kron", [*CASES, *ONE_POSITION])
KRON_IDS = [f"{c.id}-{arg}" for c, arg, _ in KRON]


def _kron_check(c: Case, arg: str, name: str) -> bool:
    """Check the factors of one sample taken twice (so the factors' ``1/N`` scaling counts);
    True where the block is a Kronecker product (then the product of the factors must be
    the block)."""
    two = _first_sample(c, copies=2)
    out = two.fn(*two.inputs)
    g = rand(3, 1, *out.shape[1:]).expand(3, *out.shape)
    factors = _run(two, lambda e, node, rule, gp: rule.kron[arg](gp, Ctx.of(node, rule, e, 1)),
                   g)
    param = two.inputs[two.names.index(name)]
    q = reference_batch_grads(two, g, 1)[two.params.index(name)].reshape(6, *param.shape)
    flat = q.reshape(6, -1)                                             # [C·N, D]
    block = flat.t() @ flat
    for f in factors:
        torch.testing.assert_close(f, f.transpose(-1, -2), rtol=1e-12, atol=1e-12)
        assert bool((torch.linalg.eigvalsh(f) > -1e-10).all()), "factor not PSD"
    if any(f.dim() != 2 for f in factors):  # groups: block-diagonal factors
        return False
    sizes = [f.size(0) for f in factors]
    assert torch.Size(sizes).numel() == block.size(0), "factor sizes do not match the block"
    if len(factors) == 1:
        exact = out[0].numel() == param.numel()  # a bias without positions
        product = factors[0]
    else:
        q = _factor_order(q, sizes)
        exact = any(_rank(m) <= 1 for m in (q.reshape(-1, sizes[1]),
                                            q.transpose(1, 2).reshape(-1, sizes[0])))
        flat, product = q.reshape(6, -1), torch.kron(*factors)
        block = flat.t() @ flat
    if exact:
        torch.testing.assert_close(product, block, rtol=1e-10, atol=1e-12)
    return exact


def _factor_order(q: torch.Tensor, sizes: list) -> torch.Tensor:
    """``[C, *p.shape]`` -> ``[C, d0, d1]`` in the factors' order: the parameter's own, or
    with its first two axes swapped (BackPACK's transposed-convolution weights)."""
    if q.size(1) != sizes[0] and q.dim() > 2 and q.size(2) == sizes[0]:
        q = q.transpose(1, 2)
    return q.reshape(q.size(0), sizes[0], sizes[1])


def _rank(m: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(m, atol=1e-9 * float(m.abs().max())))


@pytest.mark.parametrize("c, arg, name", KRON, ids=KRON_IDS)
def test_kronecker_factors_are_the_ggn_block_where_it_is_one(c, arg, name):
    _kron_check(c, arg, name)


def test_every_kron_rule_has_an_exact_case():
    exact = {(_single_op(c)[2].name, arg) for c, arg, name in KRON if _kron_check(c, arg, name)}
    declared = {(_single_op(c)[2].name, arg) for c, arg, _ in KRON}
    assert declared and not declared - exact, sorted(declared - exact)


# -- kron_matrix -------------------------------------------------------------------------------
KRON_MATRIX = _with("kron_matrix", [*CASES, *ONE_POSITION])


@pytest.mark.parametrize("c, arg, name", KRON_MATRIX,
                         ids=[f"{c.id}-{arg}" for c, arg, _ in KRON_MATRIX])
def test_kron_matrix_equals_kron_of_the_same_curvature(c, arg, name):
    one = _first_sample(c)
    out = one.fn(*one.inputs)
    g = rand(3, *out.shape)
    flat = g.reshape(3, -1)
    dense = flat.t() @ flat                                             # [D, D], D = out[0]
    from_factor = _run(one, lambda e, node, rule, gp: rule.kron[arg](
        gp, Ctx.of(node, rule, e, 1)), g)
    from_matrix = _run(one, lambda e, node, rule, m: rule.kron_matrix[arg](
        m, Ctx.of(node, rule, e)), dense)
    assert len(from_factor) == len(from_matrix)
    for a, b in zip(from_matrix, from_factor):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -- loss --------------------------------------------------------------------------------------
def _reduced_loss(c: Case) -> bool:
    found = _single_op(c)
    return found is not None and found[2].loss is not None and \
        found[2].bind(found[1]).get("reduction") != "none"


LOSSES = [c for c in CASES if _reduced_loss(c)]


def _input_index(c: Case) -> int:
    _, node, rule = _single_op(c)
    value = rule.bind(node)["input"]
    while value.op != "placeholder":  # through a call-time check of the input (class_rows)
        value = value.all_input_nodes[0]
    return c.names.index(value.target)


def _value(c: Case, node: fx.Node, value):
    """A bound argument's value: a case input, or the input a call-time check checks."""
    if not isinstance(value, fx.Node):
        return value
    if value.op != "placeholder":  # a target's check: the target it returns
        value = next(a for a in value.all_input_nodes if a.op == "placeholder"
                     and a is not rule_for(node).bind(node)["input"])
    return c.inputs[c.names.index(value.target)]


def _call_with(c: Case, reduction: str):
    """The case's loss op called on its inputs with ``reduction``."""
    _, node, rule = _single_op(c)
    bound = {k: _value(c, node, v) for k, v in rule.bind(node).items()}
    bound["reduction"] = reduction
    return node.target(*bound.values())


@pytest.mark.parametrize("c", LOSSES, ids=[c.id for c in LOSSES])
def test_loss_factors_divisor_and_target_check(c):
    _, node, rule = _single_op(c)
    index = _input_index(c)
    x = c.inputs[index]

    def loss_of(t):
        args = list(c.inputs)
        args[index] = t
        return c.fn(*args)

    samples, size = x.size(0), x[0].numel()
    full = torch.func.hessian(loss_of)(x).reshape(samples, size, samples, size)
    hessian = torch.stack([full[n, :, n] for n in range(samples)])            # [N, D, D]
    torch.testing.assert_close(full.abs().sum(2) - hessian.abs(), torch.zeros_like(hessian),
                               rtol=0, atol=1e-12, msg="the loss Hessian mixes samples")

    def squared(s):  # Σ_c S[c, n] S[c, n]ᵀ per sample
        s = s.reshape(s.size(0), samples, size)
        return torch.einsum("cni,cnj->nij", s, s)

    for exact in ("sqrt_hessian", "sqrt_hessian_low_rank"):
        if getattr(rule.loss, exact) is not None:
            s = _run(c, lambda e, n, r: getattr(r.loss, exact)(Ctx.of(n, r, e)))
            torch.testing.assert_close(squared(s), hessian, rtol=1e-10, atol=1e-12)
    if rule.loss.sqrt_hessian_mc is not None:
        torch.manual_seed(0)
        try:
            s = _run(c, lambda e, n, r: r.loss.sqrt_hessian_mc(Ctx.of(n, r, e), 20000))
        except CompileError as err:  # no likelihood to sample from: refused by name
            assert "Monte-Carlo" in str(err) and node.name in str(err), str(err)
        else:
            torch.testing.assert_close(squared(s), hessian, rtol=0,
                                       atol=0.05 * float(hessian.abs().max()))
    divisor = _run(c, lambda e, n, r: r.loss.mean_divisor(Ctx.of(n, r, e), "gradient"))
    if rule.bind(node)["reduction"] == "mean":
        torch.testing.assert_close(_call_with(c, "mean") * divisor, _call_with(c, "sum"),
                                   rtol=1e-12, atol=1e-12)
    if rule.loss.check_target is not None:
        checked = _run(c, lambda e, n, r: r.loss.check_target(Ctx.of(n, r, e)))
        target = _value(c, node, rule.bind(node)["target"])
        torch.testing.assert_close(checked, target, rtol=0, atol=0)


# -- jvp -----------------------------------------------------------------------------------------
JVP = [(c, arg, name) for c in CASES for arg, name in _input_args(c, "jvp", c.differentiable())]


@pytest.mark.parametrize("c, arg, name", JVP, ids=[f"{c.id}-{arg}" for c, arg, _ in JVP])
def test_jvp_rules_equal_forward_mode(c, arg, name):
    index = c.names.index(name)
    t = rand(2, *c.inputs[index].shape)
    actual = _run(c, lambda e, n, r, tp: r.jvp[arg](tp, Ctx.of(n, r, e, 1)), t)

    def along(v):
        def f(value):
            args = list(c.inputs)
            args[index] = value
            return c.fn(*args)
        return torch.func.jvp(f, (c.inputs[index],), (v,))[1]

    torch.testing.assert_close(actual, torch.stack([along(v) for v in t]), rtol=1e-10,
                               atol=1e-12)


# -- samples -------------------------------------------------------------------------------------
def _samples(c: Case):
    found = _single_op(c)
    return None if found is None else found[2].output_samples(found[1])


SAMPLES = [c for c in CASES if _samples(c) is not None]


@pytest.mark.parametrize("c", SAMPLES, ids=[c.id for c in SAMPLES])
def test_samples_claims_hold(c):
    out = c.fn(*c.inputs)
    if _samples(c) == REDUCED:
        assert out.dim() == 0
        return
    assert _samples(c) == KEPT
    _assert_samples_apart(c, out)


def _keeps_apart(c: Case) -> bool:
    """The single op states no reason why it mixes samples, and its output has an axis 0."""
    found = _single_op(c)
    if found is None or found[2].loss is not None:
        return False
    _, node, rule = found
    out = c.fn(*c.inputs)
    return isinstance(out, torch.Tensor) and out.dim() > 0 and not (
        rule.mixes_samples and rule.mixes_samples(rule.bind(node)))


APART = [c for c in CASES if _keeps_apart(c)]


@pytest.mark.parametrize("c", APART, ids=[c.id for c in APART])
def test_mixes_samples_states_every_mixing(c):
    """``mixes_samples``: an op that gives no reason keeps the samples of its data apart
    (sample ``n`` of the output reads sample ``n`` of each input with axis 0 of that size)."""
    _assert_samples_apart(c, c.fn(*c.inputs))


def _assert_samples_apart(c: Case, out: torch.Tensor) -> None:
    f, values = c.of_differentiable()
    if not values:
        return
    names = [n for n in c.names if n in c.differentiable()]
    for name, x, jac in zip(names, values, torch.func.jacrev(
            f, argnums=tuple(range(len(values))))(*values)):
        if name in c.params or x.dim() == 0 or x.size(0) != out.size(0):
            continue  # no sample axis (broadcast over the samples)
        blocks = jac.reshape(out.size(0), -1, x.size(0), x[0].numel())
        for n in range(out.size(0)):
            others = torch.cat([blocks[n, :, :n], blocks[n, :, n + 1:]], 1)
            assert bool((others == 0).all()), f"output sample {n} reads other samples of {name}"


# -- signed_squares ------------------------------------------------------------------------------
SIGNED = _with("signed_squares")


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("c, arg, name", SIGNED, ids=[f"{c.id}-{arg}" for c, arg, _ in SIGNED])
def test_signed_squares_equal_weighted_squared_terms(c, arg, name, per_sample):
    out = c.fn(*c.inputs)
    samples = out.size(0)
    factors = [rand(3, *out.shape), rand(2, *out.shape)]
    weights = [rand(3, samples), torch.full([1, 1], -1.0, dtype=torch.float64)]
    param = c.inputs[c.names.index(name)]
    base = rand(*([samples] if per_sample else []), *param.shape)

    diagonal = rand(*out.shape)  # a diagonal curvature at the output, subtracted

    def emit_fn(e, node, rule, f0, f1, w0, w1, r, b):
        formulas = rule.signed_squares[arg]
        ctx = Ctx.of(node, rule, e, 1)
        shares = formulas[0](f0, w0, ctx) + formulas[0](f1, w1, ctx)
        if len(formulas) == 3:
            shares = shares - formulas[2](r, Ctx.of(node, rule, e, 0))
        return formulas[1](shares, ctx, per_sample, b)

    actual = _run(c, emit_fn, *factors, *weights, diagonal, base)
    expected = base.clone()
    for g, w in zip(factors, weights):
        q = reference_batch_grads(c, g, 1)[c.params.index(name)]          # [L, N, *p]
        w = w.expand(g.size(0), samples).reshape(g.size(0), samples, *[1] * param.dim())
        squares = (w * q.square()).sum(0)
        expected = expected + (squares if per_sample else squares.sum(0))
    if len(_single_op(c)[2].signed_squares[arg]) == 3:
        squares = reference_diagonal_curvature(c, diagonal, name, rand(1, *param.shape))[
            "diagonal_batch_sum_squares"]
        expected = expected - (squares if per_sample else squares.sum(0))
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


# -- pairs: bilinear and the second-order walk's zero claims ---------------------------------------
def _pairs(c: Case) -> list:
    """``(term, placeholder names)`` of the pairs of distinct differentiable arguments of the
    single op, as the second-order walk classifies them."""
    from fxcurv.passes.curvature.second_order import classify
    found = _single_op(c)
    if found is None or found[2].loss is not None:
        return []
    _, node, rule = found
    bound = rule.bind(node)
    active = {k: v.target for k, v in bound.items() if getattr(v, "op", None) == "placeholder"
              and v.target in c.differentiable()}
    if len(set(active.values())) != len(active):
        return []  # one input in two arguments
    return [(term, [active[n] for n in term.names]) for term in
            classify(rule, bound, list(active)) if len(term.names) == 2]


PAIRS = [c for c in CASES if _pairs(c)]


@pytest.mark.parametrize("c", PAIRS, ids=[c.id for c in PAIRS])
def test_pairs_without_a_cross_term_have_none(c):
    """Where the walk says a pair has no cross term (``ZERO``: jointly affine, or a pair a
    ``bilinear`` op does not list), ``∂²⟨g, f⟩/∂a∂b = 0``; a listed ``bilinear`` pair is
    linear in each (``test_second_order_rules``), so its cross block is the derivative of the
    parameter-side argument's ``batch_grad`` (``test_vjp_and_batch_rules``) in the other."""
    from fxcurv.passes.curvature.second_order import BILINEAR, ZERO
    out = c.fn(*c.inputs)
    g = rand(*out.shape)
    for term, (first, second) in _pairs(c):
        i, j = c.names.index(first), c.names.index(second)

        def pairing(a, b):
            args = list(c.inputs)
            args[i], args[j] = a, b
            return (c.fn(*args) * g).sum()

        mixed = torch.func.hessian(pairing, argnums=(0, 1))(c.inputs[i], c.inputs[j])[0][1]
        if term.kind == ZERO:
            assert bool((mixed.abs() < 1e-12).all()), f"{term.names}: a cross term"
        elif term.kind == BILINEAR:
            assert bool((mixed.abs() > 0).any()), f"{term.names}: listed, but no cross term"


# -- stack_uses ----------------------------------------------------------------------------------
STACKED = [(c, arg, name) for c in CASES for arg, name in _input_args(c, "stack_uses", c.params)]


@pytest.mark.parametrize("c, arg, name", STACKED, ids=[f"{c.id}-{arg}" for c, arg, _ in STACKED])
def test_stacked_uses_act_like_one_call(c, arg, name):
    """``stack_uses[p] = x``: two calls ``f(x₁, p)``, ``f(x₂, p)`` with cotangents ``g₁, g₂``
    give, as one call on ``x₁, x₂`` and ``g₁, g₂`` concatenated along positions (the joined
    use the backward and per-sample passes build), the sum of the two calls' Jacobian-
    transposes and per-sample terms for ``p``."""
    from fxcurv.passes.backward import joined_use
    _, node, rule = _single_op(c)
    data = rule.bind(node)[rule.stack_uses[arg]].target
    names, index = ", ".join(c.names), c.names.index(data)
    second = ", ".join("other" if i == index else n for i, n in enumerate(c.names))
    two = eval(f"lambda {names}, other: (fn({names}), fn({second}))", {"fn": c.fn})  # noqa: S307
    graph = CurvatureTracer().trace(two)
    normalize(graph)
    uses = [(n, rule, arg) for n in graph.nodes if rule_for(n) is rule]
    with graph.inserting_before(next(iter(graph.nodes))):
        seeds = [graph.placeholder(f"g_{i}") for i in range(2)]
    emit = Emitter(graph)
    cotangents = {n: emit.proxy(s) for (n, _, _), s in zip(uses, seeds)}
    fields = [f for f in (rule.vjp, rule.batch_grad) if arg in f]
    g, ctx = joined_use(uses, cotangents, emit, 1)
    joined = [f[arg](g, ctx) for f in fields]
    apart = [sum(f[arg](cotangents[n], Ctx.of(n, rule, emit, 1)) for n, _, _ in uses)
             for f in fields]
    next(n for n in graph.nodes if n.op == "output").args = (emit.as_node([joined, apart]),)
    graph._co_fields = {}
    out = c.fn(*c.inputs)
    other = rand(*c.inputs[index].shape)
    joined, apart = fx.GraphModule(torch.nn.Module(), graph)(
        rand(2, *out.shape), rand(2, *out.shape), *c.inputs, other)
    assert joined
    for a, b in zip(joined, apart):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
