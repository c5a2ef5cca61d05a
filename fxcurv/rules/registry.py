"""The op rule table: one :class:`OpRule` per functional op, the one place to add an op.

A rule is keyed by every spelling of its op in a traced graph: the function (``F.relu``,
``torch.relu``) and the tensor-method name (``"relu"``). Rule functions take the cotangent
``g`` and a :class:`Ctx` and return emitted Proxies:

* ``vjp[arg](g, c)``: the Jacobian-transpose product ``J_argᵀ g`` for a differentiable argument
  (``None``: the output does not depend on that argument; an argument missing from ``vjp``
  that depends on the parameters is an error).
  ``g`` has ``c.lead`` leading "vector" axes before the op's output shape (0 for a gradient,
  1 for a sqrt-GGN factor ``[C, N, ...]`` or MC samples ``[M, N, ...]``); the result has the
  same leading axes before the argument's shape.
* ``batch_grad[arg](g, c)``: for a parameter argument, the per-sample cotangent
  ``[*lead, N, *arg.shape]``, where sample ``n`` is axis 0 of the op's data input.
* ``contraction[arg](g, c)``: for a parameter argument the op is linear in, the per-sample
  term declared as a contraction form (:class:`~fxcurv.rules.contraction.Contraction`, or
  None where this call has none); ``batch_grad``, ``batch_l2``, ``sum_grad_squared``,
  curvature products and per-sample square sums are derived from it
  (:mod:`fxcurv.rules.contraction`); ``batch_grad[arg]`` is filled from it when not given.

What an op *is* is a set of :data:`traits`, set by the combinators below (:func:`elementwise`,
:func:`affine`, :func:`permutation`, :func:`concatenation`, :func:`reduction`,
:func:`bilinear`, :func:`loss`) the way JAX's ``defjvp``/``deflinear``/``defbilinear`` set a
primitive's rules; passes read the traits, never an op's name.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch.fx as fx

from ..emit import Emitter

RuleFn = Callable[[Any, "Ctx"], Any]

# -- traits: what an op is (passes read these, never an op's name) ---------------------------
# each output entry depends only on the same entry of each (broadcast) argument: ``J = diag``
ELEMENTWISE = "elementwise"
# jointly affine in all its arguments: no second derivative at all (add, cat, reshape, sum)
AFFINE = "affine"
# each output entry is a copy of one input entry (reshape, transpose, ...): ``J`` is a 0/1
# selection, so ``diag(Jᵀ diag(H) J) = Jᵀ H``
PERMUTATION = "permutation"
# joins the tensors of a list argument (cat, stack): each piece gets its part of ``Jᵀ g``
CONCATENATION = "concatenation"
# reduces (sums, averages) over axes: ``Jᵀ`` broadcasts back
REDUCTION = "reduction"
# elementwise and non-decreasing, with ``f' = 0`` wherever two inputs give one output (relu):
# commutes with a window maximum, value and derivative, ties included
MONOTONE = "monotone"
# the maximum over windows (max pooling): commutes with a :data:`MONOTONE` op
WINDOW_MAX = "window_max"
# the output may share memory with the first argument (views: reshape, transpose, detach)
VIEW = "view"
# the output is new memory that aliases no argument (generated code may write into it)
FRESH = "fresh"
# the op draws random numbers: never merged with another call; a forward that draws makes
# the first-call check skip (eager would draw differently)
RANDOM = "random"
# returns a boolean tensor (comparisons, logic)
BOOLEAN = "boolean"
# returns a tuple of pieces of its input (split, chunk, unbind)
PIECES = "pieces"
# has Jacobian-transpose rules only (a fused kernel): a step that requests any quantity
# beyond the gradient refuses it at compile time (the lowering that emits it avoids that)
FIRST_ORDER = "first_order"
# elementwise in its first argument, with an out variant (the out argument its schema names):
# generated code may write the result into the first argument where that is a temporary
INTO_FIRST = "into_first"
# the output's shape comes from the call's arguments (reshape, view, squeeze, flatten): its
# axis 0 holds the samples only if it keeps axis 0's size (a call-time check in the model)
RESHAPES = "reshapes"
# couples the rows of a batch as batch statistics do (BatchNorm in train mode) where its
# ``mixes_samples`` holds, keeping each sample's row on axis 0, and its Jacobian-transpose rule
# is the full-batch one for every leading vector: a propagated factor's columns are then
# back-propagated through the coupled batch (the "one big sample" convention, conventions.md)
COUPLES_ROWS = "couples_rows"
# what an output does with the sample axis (``OpRule.samples``)
KEPT = "kept"
REDUCED = "reduced"
TRAITS = frozenset({ELEMENTWISE, AFFINE, PERMUTATION, CONCATENATION, REDUCTION, MONOTONE,
                    WINDOW_MAX, VIEW, FRESH, RANDOM, BOOLEAN, PIECES, INTO_FIRST, FIRST_ORDER,
                    RESHAPES, COUPLES_ROWS})


@dataclass(frozen=True)
class LossRule:
    """What a loss op adds to its rule (:func:`loss`): a symmetric factor ``S`` of the loss
    Hessian w.r.t. ``input``, ``H = S Sᵀ`` summed over the leading axis:
    ``sqrt_hessian(c) -> [C, *input.shape]`` exact, ``sqrt_hessian_mc(c, m) -> [m,
    *input.shape]`` sampled (``E[S Sᵀ] = H``), both carrying the reduction's scaling; the
    local divisor of reduction='mean' as a 0-dim tensor in the input's dtype,
    ``mean_divisor(c, part)`` (``part`` "gradient": what ``∂L/∂input`` divides by, PyTorch's
    mean; "hessian": what the factors divide by; data parallelism rescales each rank's results
    by its share of the summed divisors); and optionally a call-time validation
    ``check_target(c)`` that emits a check of the inputs and returns the checked ``target``
    (applied by the normalize pass, e.g. a regression target's shape); optionally
    ``sqrt_hessian_low_rank(c)``: an exact factor with fewer columns and the same ``S Sᵀ``
    (for quantities that sum over the columns: less to propagate)."""

    mean_divisor: Callable[["Ctx", str], Any]
    sqrt_hessian: Optional[Callable[["Ctx"], Any]] = None
    sqrt_hessian_mc: Optional[Callable[["Ctx", int], Any]] = None
    check_target: Optional[Callable[["Ctx"], Any]] = None
    sqrt_hessian_low_rank: Optional[Callable[["Ctx"], Any]] = None
    # input ``[N, C, d...]`` with the classes on axis 1, target ``[N, d...]`` of class indices
    # (or probabilities ``[N, C, d...]``): rows merged by ``x.reshape(-1, C)`` can be put
    # back on their own axes (``passes/sample_axis.py``)
    class_axis: bool = False


@dataclass
class OpRule:
    """Everything fxcurv knows about one op. Fields left empty mean "not supported"."""

    name: str
    signature: inspect.Signature
    vjp: dict[str, RuleFn] = field(default_factory=dict)
    batch_grad: dict[str, RuleFn] = field(default_factory=dict)
    # ... or declared as a contraction form, from which every per-sample quantity is derived
    # (``fxcurv/rules/contraction.py``; ``batch_grad`` filled from it when not given)
    contraction: dict[str, RuleFn] = field(default_factory=dict)
    # second order (diagonal Hessian): the op is affine in each differentiable argument on its
    # own (``∂²f/∂a² = 0``; True for all, a tuple of the argument names for which it holds,
    # or a function of the bound arguments returning either)
    hessian_is_zero: Union[bool, tuple, Callable[[dict], Union[bool, tuple]]] = False
    # ... or, for elementwise ops, ``residual[arg](g, c)``: the diagonal of ``Σ_out g ∂²f/∂a²``
    # shaped like ``a`` (``g`` the gradient at the output, lead 0)
    residual: dict[str, RuleFn] = field(default_factory=dict)
    # ... otherwise, for elementwise ops with same-shaped arguments, ``cross[(a, b)](g, c)``:
    # the diagonal of ``Σ_out g ∂²f/∂a∂b``, shaped like the output (``mul``: ``g``)
    cross: dict[tuple, RuleFn] = field(default_factory=dict)
    # ... or a dense per-sample residual block ``residual_block[(a,)](g, c) -> [N, B, K, K]``:
    # ``R_n = Σ_out g ∂²f/∂a²`` over a's per-sample entries ``a[n].flatten()`` (``g`` lead 0),
    # block-diagonal with ``B`` blocks of ``K`` consecutive entries (``B = 1``: dense;
    # softmax, layer_norm: a block per row); for a bilinear op (matmul, einsum) ``[(a, b)]``
    # gives the cross matrix ``C_n = Σ_out g ∂²f/∂a∂b`` ``[N, Da, Db]`` (``R_n = [[0, C],
    # [Cᵀ, 0]]``), used where both arguments share a parameter
    residual_block: dict[tuple, RuleFn] = field(default_factory=dict)
    # argument pairs in which the op is jointly bilinear (``f(a, b)`` linear in each, nothing
    # else depending on them): where a data argument and a parameter-side one share a
    # parameter (a tied weight, ``lin(lin(x))``), their per-sample cross block
    # ``∂²⟨g_n, f⟩/∂a_n∂b`` is the parameter-side argument's ``batch_grad`` rule with ``a``
    # replaced by the basis of its per-sample entries. Pairs not listed (without ``cross`` or
    # ``residual_block`` rules) have no cross term: the op is jointly affine in them (a bias)
    bilinear: tuple = ()
    # parameter argument -> data argument: several calls of this op that use the parameter
    # there act like one call on their data concatenated along a position axis (linear: the
    # per-sample terms sum over positions), so per-sample rules and Kronecker factors of a
    # weight used at every step of a recurrent layer run once, on all steps
    stack_uses: dict[str, str] = field(default_factory=dict)
    # Kronecker factors of a parameter argument from a sqrt-GGN factor ``g`` (lead 1):
    # ``kron[arg](g, c) -> [G, A]`` (weights) or ``[G]`` (biases), BackPACK's order and scaling
    kron: dict[str, RuleFn] = field(default_factory=dict)
    # ... the same list from a dense output curvature ``M`` ``[D, D]`` (``D``: one sample's
    # output size; KFRA): ``kron_matrix[arg](M, c)`` (without it KFRA factors ``M`` for ``kron``)
    kron_matrix: dict[str, RuleFn] = field(default_factory=dict)
    # KFRA's batch-averaged sandwich ``(1/N) Σ_n J_nᵀ M J_n`` (``[D_out, D_out] ->
    # [D_in, D_in]``) through a data argument: "shared" (``J_n`` the same for every sample:
    # ``vjp`` applied to M's rows and columns for one sample), "diagonal" (elementwise,
    # ``J_n = diag(d_n)``: ``M ⊙ E[d dᵀ]``) or a function ``(M, c) -> M_in``; without it,
    # ``vjp`` is applied twice with all N samples (``[D, N, *in]`` intermediates)
    sandwich: dict[str, Union[str, RuleFn]] = field(default_factory=dict)
    # the output does not depend differentiably on any input (sizes, masks, fills); a
    # predicate of the bound arguments when that depends on them (``getattr(x, "shape")``)
    constant: Union[bool, Callable[[dict], bool]] = False
    # ``signed_squares[arg] = (part, total)``: the ``batch_sum_grad_squared`` (per_sample) or
    # ``sum_grad_squared`` formulas of several factors (lead 1) of one use, their columns
    # weighted (``[L, N]``, or ``[1, 1]``: a sign), in two steps: ``part(g, w, c)`` each
    # factor's share (right after its propagation, a small ``[N, O]`` for a linear layer),
    # ``total(Σ shares, c, per_sample, base)`` ``base +`` the result (one product with the
    # data for all of them: the Hessian's residual parts added to its GGN part); an optional
    # third ``diagonal(r, c)`` (lead 0): the share, in ``part``'s shape, of a diagonal
    # curvature ``r`` at the output (a residual pulled back at its producer,
    # ``diagonal_squares``), added to the others before the one product
    signed_squares: dict[str, tuple] = field(default_factory=dict)
    # a diagonal curvature ``diag(r)`` at the output (an elementwise op's residual right
    # after this op), ``Σ_d r_d (∂y_d/∂arg)²`` without a square-root factor
    # (``fxcurv/rules/contraction.py``, :func:`diagonal_curvature`): "form", the declared
    # ``contraction`` of ``arg`` always exists and its left factor is a rearrangement of the
    # output's entries, each parameter entry meeting an output entry at one position at most,
    # so ``∂y_d/∂w`` is one entry of the right factor ``R`` (the form with ``g = r`` and
    # ``R²``); "unit", each output entry depends on at most one entry of ``arg``, with
    # coefficient 1 (a bias): ``Jᵀ diag(r) J = diag(Jᵀ r)``
    diagonal_squares: dict[str, str] = field(default_factory=dict)
    # forward tangents (block curvature products, passes/curvature/products.py):
    # ``jvp[arg](t, c)``: ``J_arg t`` for a tangent ``t`` ``[V, *arg.shape]`` of any argument
    # (a data argument's ``[V, N, *x]``, a parameter's vectors ``[V, *p.shape]``) ->
    # ``[V, *out.shape]``; arguments with a "diagonal" ``sandwich`` use their ``vjp`` (``J = Jᵀ``)
    jvp: dict[str, RuleFn] = field(default_factory=dict)
    # reason why this call mixes samples (per-sample quantities undefined), or None
    mixes_samples: Optional[Callable[[dict], Optional[str]]] = None
    # the rank its negative axis arguments count from, less the data argument's rank: 1 where
    # they count the output's axes and the op adds one (stack, unsqueeze); see
    # ``passes/sample_axis.py``, which resolves negative axes when the step runs
    axis_rank_offset: int = 0
    # reason why this call's constant arguments are unsupported, or None
    unsupported: Optional[Callable[[dict], Optional[str]]] = None
    # decomposition: emits the op's forward from other ops, or returns None to keep this call
    # (an exact rewrite that applies to some calls only); applied by the normalize pass
    lower: Optional[Callable[["Ctx"], Any]] = None
    # losses: their Hessian factors and mean divisor (:class:`LossRule`, set by :func:`loss`)
    loss: Optional[LossRule] = None
    # what the output does with the sample axis 0 (the scalar-loss check): KEPT (keeps axis 0
    # of any tensor argument that has one: elementwise ops, unreduced losses, sums over other
    # axes), REDUCED (0-dim: full reductions, reduced losses) or None (unknown); or a function
    # of the bound arguments returning one of these
    samples: Union[Optional[str], Callable[[dict], Optional[str]]] = None
    # what the op is (:data:`TRAITS`), set by the combinators
    traits: frozenset = frozenset()
    doc: str = ""

    @property
    def has_sqrt_hessian(self) -> bool:
        """A built-in loss with its own Hessian square roots (``loss.sqrt_hessian``)."""
        return self.loss is not None and self.loss.sqrt_hessian is not None

    def has(self, trait: str) -> bool:
        """The op has ``trait`` (one of :data:`TRAITS`)."""
        return trait in self.traits

    def is_constant(self, node: fx.Node) -> bool:
        """True if this call's output has no derivative with respect to any input."""
        return self.constant(self.bind(node)) if callable(self.constant) else self.constant

    def output_samples(self, node: fx.Node) -> Optional[str]:
        """:data:`KEPT`, :data:`REDUCED` or None: what this call does with the sample axis."""
        return self.samples(self.bind(node)) if callable(self.samples) else self.samples

    def zero_hessian(self, arg: str, bound: dict) -> bool:
        """True if ``∂²f/∂arg² = 0`` (the op is affine in ``arg`` with the others fixed)."""
        if AFFINE in self.traits:
            return True
        zero = self.hessian_is_zero
        zero = zero(bound) if callable(zero) else zero
        return arg in zero if isinstance(zero, tuple) else bool(zero)

    def bind(self, node: fx.Node) -> dict[str, Any]:
        """Map the node's args and kwargs to this op's parameter names, defaults filled."""
        try:
            bound = self.signature.bind(*node.args, **node.kwargs)
        except TypeError as err:
            raise TypeError(f"cannot match the arguments of {node.format_node()} to "
                            f"{self.name}{self.signature}: {err}") from None
        bound.apply_defaults()
        return dict(bound.arguments)


RULES: dict[Any, OpRule] = {}


def signature(params: str) -> inspect.Signature:
    """``signature("input, weight, bias=None")`` -> an :class:`inspect.Signature`."""
    return inspect.signature(eval(f"lambda {params}: None"))  # noqa: S307 (trusted literals)


def register(targets: list, name: str, params: str, traits: tuple = (),
             **fields: Any) -> OpRule:
    """Register one rule under every spelling in ``targets`` (functions or method names),
    with ``traits`` (:data:`TRAITS`) besides those its combinator set."""
    unknown = set(traits) - TRAITS
    if unknown:
        raise KeyError(f"unknown traits {sorted(unknown)} for {name}")
    rule = OpRule(name=name, signature=signature(params), traits=frozenset(traits), **fields)
    if rule.contraction:  # (imported here: the contraction module marks helpers with traits)
        from .contraction import batch_grad_of
        derived = {arg: batch_grad_of(declare) for arg, declare in rule.contraction.items()}
        merged = {**derived, **rule.batch_grad}
        rule.batch_grad = {a: merged[a] for a in rule.signature.parameters if a in merged}
    for target in targets:
        if target in RULES:
            raise KeyError(f"a rule for {target!r} is registered twice")
        RULES[target] = rule
    return rule


# -- combinators: one per kind of op -----------------------------------------------------------
def elementwise(targets: list, name: str, params: str, traits: tuple = (),
                **fields: Any) -> OpRule:
    """``y_i = f(a_i, b_i, ...)`` (arguments broadcast): ``J = diag(∂f/∂a)`` per argument; the
    output keeps the samples (unless ``samples`` says otherwise)."""
    return register(targets, name, params, (ELEMENTWISE, *traits),
                    samples=fields.pop("samples", KEPT), **fields)


def unary(targets: list, name: str, params: str, traits: tuple = (), **fields: Any) -> OpRule:
    """An elementwise ``y = f(x)`` of one tensor ``input``: ``J_n = diag(f'(x_n))``, so KFRA's
    batch-averaged ``(1/N) Σ_n J_nᵀ M J_n`` is the "diagonal" sandwich ``M ⊙ E[f' f'ᵀ]``."""
    return elementwise(targets, name, params, traits, sandwich={"input": "diagonal"}, **fields)


def affine(targets: list, name: str, params: str, traits: tuple = (),
           **fields: Any) -> OpRule:
    """``y = A(args) + b``, jointly affine in all arguments: every second derivative is 0."""
    return register(targets, name, params, (AFFINE, *traits), **fields)


def permutation(targets: list, name: str, params: str, traits: tuple = (),
                **fields: Any) -> OpRule:
    """``y = P x`` with ``P`` a 0/1 selection (each output entry a copy of one input entry);
    ``traits=(VIEW,)`` where the result may share ``x``'s memory."""
    return affine(targets, name, params, (PERMUTATION, *traits), **fields)


def concatenation(targets: list, name: str, params: str, **fields: Any) -> OpRule:
    """``y = [x₁, x₂, ...]``: the pieces of a list argument joined, ``Jᵀ g`` split back."""
    return affine(targets, name, params, (CONCATENATION,), **fields)


def reduction(targets: list, name: str, params: str, traits: tuple = (),
              **fields: Any) -> OpRule:
    """``y = Σ_axes x`` (or a mean): linear, ``Jᵀ`` broadcasts back."""
    return register(targets, name, params, (REDUCTION, FRESH, *traits), hessian_is_zero=True,
                    **fields)


def bilinear(targets: list, name: str, params: str, pairs: tuple, traits: tuple = (),
             **fields: Any) -> OpRule:
    """``y = f(a, b)`` linear in each argument of each pair in ``pairs`` with the other fixed
    (``∂²f/∂a² = 0``); the pairs' cross terms are the rule's ``residual_block`` or ``cross``,
    or read off a parameter-side argument's ``batch_grad``."""
    return register(targets, name, params, traits, hessian_is_zero=True,
                    bilinear=pairs, **fields)


def loss(targets: list, name: str, params: str, mean_divisor: Callable,
         sqrt_hessian: Optional[Callable] = None, sqrt_hessian_mc: Optional[Callable] = None,
         check_target: Optional[Callable] = None,
         sqrt_hessian_low_rank: Optional[Callable] = None, class_axis: bool = False,
         **fields: Any) -> OpRule:
    """A built-in loss ``L = reduce_n ℓ(input_n, target_n)``: its Hessian factors (none: the
    Hessian is assembled from its ops), mean divisor and target check (:class:`LossRule`);
    reduced, its output is 0-dim; with reduction='none' it keeps the input's sample axis."""
    return register(targets, name, params, loss=LossRule(
        mean_divisor, sqrt_hessian, sqrt_hessian_mc, check_target, sqrt_hessian_low_rank,
        class_axis),
        samples=lambda b: KEPT if b["reduction"] == "none" else REDUCED, **fields)


# calls without a rule (helpers that generated code calls, torch ops) marked with a trait
# where they are defined or first used
MARKED: dict[str, set] = {FRESH: set(), VIEW: set(), PERMUTATION: set(), RANDOM: set(),
                          INTO_FIRST: set()}


def marked(trait: str, target: Any) -> Any:
    """Give ``target`` (a helper, a torch op or a method name without a rule) ``trait``;
    returns it."""
    MARKED[trait].add(target)
    return target


def fresh(fn: Callable) -> Callable:
    """Decorator: ``fn`` returns new memory (or a tuple of it) that aliases no argument."""
    return marked(FRESH, fn)


def reshaping(fn: Callable) -> Callable:
    """Decorator: ``fn`` returns its first argument's entries rearranged, possibly a view."""
    return marked(PERMUTATION, marked(VIEW, fn))


# ``helper -> (joint, label)``: ``helper(y, x, *rest)`` recomputes a by-product of the forward
# call ``y = f(x, *rest)``; ``joint(x, *rest)`` returns ``(y, by-product)`` in one call; the
# generated code names the by-product ``{y}_{label}``
BY_PRODUCTS: dict[Callable, tuple[Callable, str]] = {}


def by_product(joint: Callable, label: str) -> Callable[[Callable], Callable]:
    """Decorator for ``helper(y, x, *rest)``, a by-product of ``y = f(x, *rest)`` that
    ``joint(x, *rest) -> (y, by-product)`` computes with ``y`` (a max pool's argmax)."""
    def mark(helper: Callable) -> Callable:
        BY_PRODUCTS[helper] = (joint, label)
        return helper
    return mark


def has_trait(target: Any, trait: str) -> bool:
    """The call target has ``trait``: its rule's, or one it was :func:`marked` with."""
    try:
        return target in MARKED.get(trait, ()) or (
            target in RULES and trait in RULES[target].traits)
    except TypeError:  # unhashable target
        return False


def rule_for(node: fx.Node) -> Optional[OpRule]:
    """The rule of a ``call_function`` / ``call_method`` node, or None."""
    if node.op in ("call_function", "call_method"):
        try:
            return RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


class Args:
    """Bound arguments of a node as attributes: Proxies for nodes, constants as they are."""

    def __init__(self, bound: dict[str, Any], emit: Emitter):
        for key, value in bound.items():
            setattr(self, key, fx.node.map_arg(value, emit.proxy))


@dataclass
class Ctx:
    """What a rule function sees: the forward node, its bound args and output as Proxies,
    the number of leading vector axes, and the emitter (for helper calls)."""

    node: fx.Node
    bound: dict[str, Any]
    args: Args
    out: Any
    lead: int
    emit: Emitter

    @classmethod
    def of(cls, node: fx.Node, rule: OpRule, emit: Emitter, lead: int = 0) -> "Ctx":
        bound = rule.bind(node)
        return cls(node, bound, Args(bound, emit), emit.proxy(node), lead, emit)

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Emit a call to a scriptable helper."""
        return self.emit.call(fn, *args, **kwargs)
