"""Products of two tensors: ``matmul`` (``@``, ``mm``, ``bmm``), ``einsum``, and attention.

``y = a @ b`` is bilinear: ``ā = g bᵀ``, ``b̄ = aᵀ g``, each summed over the batch axes that
broadcasting created (1-D operands are promoted to matrices and back). ``einsum`` transposes by
another ``einsum`` with the equation rearranged: ``ā = einsum("<out>,<b>-><a>", g, b)``. Lead
axes of ``g`` get fresh subscript letters. Per sample (a parameter operand without a sample
axis, the other operand with the samples on axis 0): the same products without the sum over
samples, ``[*lead, N, *param.shape]``. Both are affine in each operand on its own
(``hessian_is_zero``), not jointly (``q kᵀ`` of one parameter has cross terms).

``scaled_dot_product_attention`` is lowered to ``softmax(q kᵀ · scale + mask) v``.
"""
from __future__ import annotations

import operator
import string
from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ..errors import node_error
from .contraction import Contraction
from .helpers import sum_to_shape
from .registry import FRESH, VIEW, Ctx, affine, bilinear, register


# -- matmul: runtime helpers (TorchScript-scriptable) ----------------------------------------
def matmul_input_vjp(g: Tensor, other: Tensor, lead: int, shape: List[int]) -> Tensor:
    """``ā = g bᵀ`` summed to ``a``'s shape ``[*lead, *shape]`` (1-D operands promoted)."""
    b = other.unsqueeze(-1) if other.dim() == 1 else other
    if other.dim() == 1:
        g = g.unsqueeze(-1)
    if len(shape) == 1:
        g = g.unsqueeze(-2)
    promoted = [1] + list(shape) if len(shape) == 1 else list(shape)
    t = sum_to_shape(torch.matmul(g, b.transpose(-1, -2)), lead, promoted)
    return t.reshape(list(t.shape[:lead]) + list(shape))


def matmul_other_vjp(g: Tensor, input: Tensor, lead: int, shape: List[int]) -> Tensor:
    """``b̄ = aᵀ g`` summed to ``b``'s shape; a matrix ``b`` contracts all rows of ``a`` at once
    (``[R, K]ᵀ [*lead, R, P]``) without a per-batch ``[..., K, P]`` intermediate."""
    a = input.unsqueeze(0) if input.dim() == 1 else input
    if len(shape) == 1:
        g = g.unsqueeze(-1)
    if input.dim() == 1:
        g = g.unsqueeze(-2)
    promoted = list(shape) + [1] if len(shape) == 1 else list(shape)
    if len(promoted) == 2:
        rows = a.reshape(-1, a.size(-1))
        t = torch.matmul(rows.t(), g.reshape(list(g.shape[:lead]) + [-1, g.size(-1)]))
    else:
        t = sum_to_shape(torch.matmul(a.transpose(-1, -2), g), lead, promoted)
    return t.reshape(list(t.shape[:lead]) + list(shape))


def merge_axes(t: Tensor, start: int, counts: List[int]) -> Tensor:
    """Keep ``t``'s first ``start`` axes and merge the following ones in runs of ``counts``
    (an empty run gives a size-1 axis)."""
    shape: List[int] = list(t.shape[:start])
    axis = start
    for count in counts:
        size = 1
        for i in range(axis, axis + count):
            size *= t.size(i)
        shape.append(size)
        axis += count
    return t.reshape(shape)


def matmul_weight_factors(g: Tensor, data: Tensor, lead: int, shape: List[int],
                          param_first: bool) -> Tuple[Tensor, Tensor]:
    """Contraction factors of a parameter operand ``w`` (``shape``, no sample axis) of
    ``x @ w`` (``L = g [*lead, N, G, P, O]``, ``R = x [N, G, P, K]``, ``w = [G, K, O]``) or
    ``w @ x`` (positions last: ``L = g [*lead, N, G, R, P]``, ``R = x [N, G, K, P]``,
    ``w = [G, R, K]``), 1-D operands promoted. The output's batch axes after the samples are
    groups where ``w`` has them with size > 1, else positions (``w`` broadcast over them)."""
    if data.dim() < 2 + int(param_first) or len(shape) > data.dim():
        raise RuntimeError("fxcurv: per-sample matmul of a parameter needs the data operand "
                           "to have the samples on axis 0 of the result (x @ W: x at least "
                           "2-D; W @ x: x at least 3-D; W at most as many axes as x)")
    shape = list(shape)
    if param_first:
        g = g.unsqueeze(-2) if len(shape) == 1 else g
        shape = [1] + shape if len(shape) == 1 else shape
    else:
        g = g.unsqueeze(-1) if len(shape) == 1 else g
        shape = shape + [1] if len(shape) == 1 else shape
        if data.dim() == 2:
            data, g = data.unsqueeze(1), g.unsqueeze(lead + 1)
    batch: List[int] = list(g.shape[lead + 1:-2])
    while data.dim() < len(batch) + 3:
        data = data.unsqueeze(1)
    data = data.expand([data.size(0)] + batch + list(data.shape[-2:]))
    groups: List[int] = []
    positions: List[int] = []
    for i in range(len(batch)):
        j = len(shape) - 2 - len(batch) + i
        if j >= 0 and shape[j] != 1:
            groups.append(i)
        else:
            positions.append(i)
    order = groups + positions
    g = g.permute(list(range(lead + 1)) + [lead + 1 + i for i in order] + [-2, -1])
    data = data.permute([0] + [1 + i for i in order] + [-2, -1])
    if not param_first:  # positions and rows merged: [.., G, P·R, F]
        counts = [len(groups), len(positions) + 1, 1]
        return merge_axes(g, lead + 1, counts), merge_axes(data, 1, counts)
    counts = [len(groups), 1, len(positions) + 1]  # rows first, positions last: [.., G, F, P]
    g = g.movedim(-2, lead + 1 + len(groups))
    return merge_axes(g, lead + 1, counts), merge_axes(data.movedim(-2, 1 + len(groups)), 1,
                                                      counts)


def matmul_cross_block(g: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per-sample cross second derivative of ``Σ g ⊙ (a @ b)`` ``[N, Da, Db]``, both operands
    with the samples on axis 0 and equal batch axes ``β`` (``[N, ..., T, K] @ [N, ..., K, U]``):
    ``∂²/∂a_βtk ∂b_β'k'u = g_βtu δ_ββ' δ_kk'``."""
    if a.dim() < 3 or a.dim() != b.dim() or a.shape[:-2] != b.shape[:-2]:
        raise RuntimeError("fxcurv: the second derivative of a @ b with both operands "
                           "depending on the parameters needs both with the samples on axis 0 "
                           "and equal batch axes ([N, ..., T, K] @ [N, ..., K, U])")
    rows = g.reshape(g.size(0), -1, g.size(-2), g.size(-1))                  # [N, B, T, U]
    eye_batch = torch.eye(rows.size(1), dtype=g.dtype, device=g.device)
    eye_inner = torch.eye(a.size(-1), dtype=g.dtype, device=g.device)
    cross = torch.einsum("nbtu,bc,kl->nbtkclu", rows, eye_batch, eye_inner)
    return cross.reshape(g.size(0), a[0].numel(), b[0].numel())


def _matmul_block(first: str, second: str):
    """The cross matrix ``C`` ``[N, Da, Db]`` (:func:`matmul_cross_block`)."""
    def rule(g, c: Ctx):
        return c.call(matmul_cross_block, g, getattr(c.args, first), getattr(c.args, second))
    return rule


def _matmul(targets: list, name: str, params: str, batched: bool = True) -> None:
    """``batched``: the operands may have batch axes (a per-sample cross block exists)."""
    first, second = [p.strip() for p in params.split(",")]

    def operands(c: Ctx):
        return getattr(c.args, first), getattr(c.args, second)

    def rule(helper, data_is_other: bool):
        def fn(g, c: Ctx):
            a, b = operands(c)
            param, data = (a, b) if data_is_other else (b, a)
            return c.call(helper, g, data, c.lead, param.shape)
        return fn

    def contraction(param_first: bool):
        def declare(g, c: Ctx) -> Contraction:
            a, b = operands(c)
            param, data = (a, b) if param_first else (b, a)
            factors = c.call(matmul_weight_factors, g, data, c.lead, param.shape, param_first)
            return Contraction(factors[0], factors[1], param, swap=not param_first,
                               last=param_first)
        return declare

    bilinear(targets, name, params, ((first, second),), traits=(FRESH,),
             doc=f"y = {first} @ {second} (broadcast batch axes);  ā = g bᵀ, b̄ = aᵀ g summed "
                 "over broadcast axes; per sample without the sum.",
             vjp={first: rule(matmul_input_vjp, True), second: rule(matmul_other_vjp, False)},
             contraction={first: contraction(True), second: contraction(False)},
             residual_block={(first, second): _matmul_block(first, second)} if batched else {})


_matmul([torch.matmul, "matmul", operator.matmul], "matmul", "input, other")
_matmul([torch.mm, "mm"], "mm", "input, mat2", batched=False)
_matmul([torch.bmm, "bmm"], "bmm", "input, mat2")


def _lower_addmm(c: Ctx):
    """``β·input + α·(batch1 @ batch2)`` (baddbmm) or ``β·input + α·(mat1 @ mat2)``."""
    names = [n for n in c.bound if n not in ("input", "beta", "alpha")]
    product = torch.matmul(getattr(c.args, names[0]), getattr(c.args, names[1]))
    beta, alpha = c.bound["beta"], c.bound["alpha"]
    product = product if alpha == 1 else product * alpha
    if beta == 0:
        return product
    return product + (c.args.input if beta == 1 else c.args.input * beta)


register([torch.baddbmm, "baddbmm"], "baddbmm", "input, batch1, batch2, beta=1, alpha=1",
         doc=_lower_addmm.__doc__, lower=_lower_addmm)
register([torch.addmm, "addmm"], "addmm", "input, mat1, mat2, beta=1, alpha=1",
         doc=_lower_addmm.__doc__, lower=_lower_addmm)


register([torch.mv, "mv"], "mv", "input, vec", doc="y = A v (A: [m, n], v: [n]): matmul.",
         lower=lambda c: torch.matmul(c.args.input, c.args.vec))
register([torch.vdot, torch.dot, "vdot", "dot"], "dot", "input, other",
         doc="y = Σ_i a_i b_i of two real vectors: mul, sum (vdot conjugates its first "
             "argument, the identity for real tensors).",
         lower=lambda c: (c.args.input * c.args.other).sum())


# -- einsum ------------------------------------------------------------------------------------
EINSUM_OPERANDS = ("operand0", "operand1", "operand2", "operand3")


def _tokens(subscript: str) -> list[str]:
    """``"...ij"`` -> ``["...", "i", "j"]``."""
    out, rest = [], subscript
    while rest:
        if rest.startswith("..."):
            out.append("...")
            rest = rest[3:]
        else:
            out.append(rest[0])
            rest = rest[1:]
    return out


def parse_einsum(equation: str, count: int) -> tuple[list[list[str]], list[str]]:
    """Operand and output subscripts as token lists, the implicit output made explicit."""
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    inputs = [_tokens(s) for s in lhs.split(",")]
    if len(inputs) != count:
        raise ValueError(f"einsum equation {equation!r} has {len(inputs)} operands, got {count}")
    if "->" not in equation:
        letters = [t for s in inputs for t in s if t != "..."]
        rhs = ("..." if any("..." in s for s in inputs) else "") + "".join(
            sorted(t for t in set(letters) if letters.count(t) == 1))
    return inputs, _tokens(rhs)


def _einsum_operands(b: dict) -> list:
    return [b[n] for n in EINSUM_OPERANDS if b[n] is not None]


def _einsum_unsupported(b: dict) -> Optional[str]:
    operands = _einsum_operands(b)
    try:
        inputs, output = parse_einsum(b["equation"], len(operands))
    except ValueError as err:
        return str(err)
    for tokens in inputs:
        letters = [t for t in tokens if t != "..."]
        if len(set(letters)) != len(letters):
            return "einsum with a repeated index in one operand (a diagonal) has no rule"
        if "..." in tokens and "..." not in output:
            return "einsum summing over the '...' axes has no rule (keep '...' in the output)"
    return None


def _fresh(inputs: list, output: list, count: int) -> list[str]:
    used = {t for s in inputs + [output] for t in s}
    return [ch for ch in string.ascii_letters if ch not in used][:count]


def restore_axes(t: Tensor, lead: int, axes: List[int], shape: List[int]) -> Tensor:
    """Re-insert the ``axes`` of an operand that only it indexes (summed in the forward), as a
    broadcast ``[*lead, *shape]``; ``axes`` non-negative from the front (after ``lead``) or
    negative from the end, front ones ascending, end ones descending."""
    for axis in axes:
        t = t.unsqueeze(lead + axis if axis >= 0 else axis)
    return t.expand(list(t.shape[:lead]) + list(shape))


def _einsum_transpose(g, c: Ctx, index: int, per_sample: bool):
    """``einsum("<lead><out>,<others>-><lead>[n]<operand>", g, others)``, then the operand's
    own summed axes re-inserted and ``...`` broadcasting undone."""
    operands = [getattr(c.args, n) for n in EINSUM_OPERANDS if c.bound[n] is not None]
    inputs, output = parse_einsum(c.bound["equation"], len(operands))
    if per_sample:
        inputs, output, sample = _per_sample_subscripts(c, inputs, output, index)
    lead = _fresh(inputs, output, c.lead)
    others = [s for i, s in enumerate(inputs) if i != index]
    seen = {t for s in others + [output] for t in s}
    target = inputs[index]
    kept = [t for t in target if t == "..." or t in seen]
    result = lead + ([sample] if per_sample else []) + kept
    equation = ",".join("".join(s) for s in [lead + output] + others) + "->" + "".join(result)
    t = torch.einsum(equation, g, *[o for i, o in enumerate(operands) if i != index])
    shift = c.lead + int(per_sample)
    axes = _dropped_axes(target, seen)
    shape = operands[index].shape
    if axes:
        t = c.call(restore_axes, t, shift, axes, shape)
    if "..." in target:
        t = c.call(sum_to_shape, t, shift, shape)
    return t


def _dropped_axes(target: list, seen: set) -> list[int]:
    """Positions of the letters only ``target`` has, for :func:`restore_axes`."""
    if "..." not in target:
        return [i for i, t in enumerate(target) if t not in seen]
    cut = target.index("...")
    front = [i for i, t in enumerate(target[:cut]) if t not in seen]
    back = [i - len(target) for i, t in enumerate(target) if i > cut and t not in seen]
    return front + back[::-1]


def _per_sample_subscripts(c: Ctx, inputs: list, output: list, index: int):
    """Name the sample axis: the output's axis 0, which the data operands (the others that
    start with it) index first; the parameter operand must not index it."""
    others = [i for i in range(len(inputs)) if i != index]
    data = [i for i in others if inputs[i][:1] == output[:1]]
    if not data or output[0] in inputs[index]:
        raise node_error(c.node, "the einsum does not keep the sample axis of its data operand "
                         "as the output's axis 0, so per-sample quantities are undefined",
                         "Keep the samples on axis 0 or request only 'grad'.")
    if output[0] != "...":
        return inputs, output, output[0]
    if any("..." in inputs[i] for i in range(len(inputs)) if i not in data):
        raise node_error(c.node, "per-sample einsum with '...' in the parameter operand has no "
                         "rule", "Name the axes with letters.")
    sample = _fresh(inputs, output, 1)[0]
    inputs = [[sample] + s if i in data else s for i, s in enumerate(inputs)]
    return inputs, [sample] + output, sample


def _carries_samples(node: Any) -> bool:
    """True if ``node`` is computed from the graph's first input (the data ``x``) other than
    through the size of a later axis or metadata (``passes.analysis.holds_samples``)."""
    from fxcurv.passes.analysis import holds_samples  # noqa: PLC0415 (it imports the rules)

    return isinstance(node, fx.Node) and holds_samples(node)


def _einsum_mixes(b: dict) -> Optional[str]:
    operands = _einsum_operands(b)
    if _einsum_unsupported(b):
        return None
    inputs, output = parse_einsum(b["equation"], len(operands))
    for tokens, node in zip(inputs, operands):
        if _carries_samples(node) and tokens and output[:1] != tokens[:1]:
            return "its output's axis 0 is not the sample axis 0 of a data operand"
    return None


def axis_eye(t: Tensor, axis: int) -> Tensor:
    """The identity ``[S, S]`` with ``S = t.size(axis)``, in ``t``'s dtype and device."""
    return torch.eye(t.size(axis), dtype=t.dtype, device=t.device)


def axis_ones(t: Tensor, axis: int) -> Tensor:
    """Ones ``[t.size(axis)]`` in ``t``'s dtype and device."""
    return torch.ones(t.size(axis), dtype=t.dtype, device=t.device)


def pair_matrix(t: Tensor, first: int) -> Tensor:
    """``[N, *A, *B]`` -> ``[N, |A|, |B|]`` with ``A`` the ``first`` axes after the samples."""
    size = 1
    for axis in range(1, first + 1):
        size *= t.size(axis)
    return t.reshape(t.size(0), size, -1)


def _einsum_cross(first: int, second: int):
    """Per-sample cross block ``∂²(Σ g ⊙ y)/∂a∂b`` ``[N, Da, Db]`` of two operands ``a, b``
    (``first``, ``second``) that start with the output's sample letter ``n``: ``einsum(g,
    other operands, δ_ll' for each letter l that a and b share)`` with b's shared letters
    primed, ones for letters only ``a`` (or ``b``) has."""
    def rule(g, c: Ctx):
        operands = [getattr(c.args, n) for n in EINSUM_OPERANDS if c.bound[n] is not None]
        inputs, output = parse_einsum(c.bound["equation"], len(operands))
        a, b = inputs[first], inputs[second]
        if "..." in a + b or not (output[:1] == a[:1] == b[:1]):
            raise node_error(c.node, "the cross second derivative of an einsum needs both "
                             "operands to start with the output's sample letter and no '...'",
                             "Name the axes with letters, samples first.")
        others = [i for i in range(len(inputs)) if i not in (first, second)]
        seen = {t for i in others for t in inputs[i]} | set(output)
        shared = [t for t in a[1:] if t in b[1:]]
        fresh = dict(zip(shared, _fresh(inputs, output, len(shared))))
        terms = [(output, g)] + [(inputs[i], operands[i]) for i in others]
        terms += [([t, fresh[t]], c.call(axis_eye, operands[first], a.index(t)))
                  for t in shared]
        for tokens, operand, other in ((a, operands[first], b), (b, operands[second], a)):
            terms += [([t], c.call(axis_ones, operand, tokens.index(t)))
                      for t in tokens[1:] if t not in seen and t not in other]
        result = a + [fresh.get(t, t) for t in b[1:]]
        equation = ",".join("".join(t) for t, _ in terms) + "->" + "".join(result)
        cross = torch.einsum(equation, *[operand for _, operand in terms])
        return c.call(pair_matrix, cross, len(a) - 1)
    return rule


def _einsum_spec(inputs: list, output: list, index: int) -> Optional[tuple]:
    """For a two-operand einsum without '...' whose data operand starts with the output's
    sample letter ``n``: the parameter operand's letters split into groups (in the output and
    the data), ``A`` (output only) and ``B`` (data only), and the positions (output and data,
    not the parameter). Returns the left and right subscripts (after ``n``: groups, positions,
    then ``A`` or ``B``), the lengths of those runs for each, and ``swap``; None when the
    parameter has letters of its own or is not ordered ``groups + A + B`` (or ``B + A``)."""
    if len(inputs) != 2 or "..." in output + inputs[0] + inputs[1] or not output:
        return None
    sample, param, data = output[0], inputs[index], inputs[1 - index]
    if data[:1] != [sample] or sample in param:
        return None
    groups = [t for t in param if t in output and t in data]
    rows = [t for t in param if t in output and t not in data]
    cols = [t for t in param if t in data and t not in output]
    positions = [t for t in output[1:] if t in data and t not in param]
    if param not in (groups + rows + cols, groups + cols + rows):
        return None
    return ([sample] + groups + positions + rows, [sample] + groups + positions + cols,
            [len(groups), len(positions), len(rows)], [len(groups), len(positions), len(cols)],
            param != groups + rows + cols)


def _einsum_contraction(index: int):
    """Declares operand ``index``'s per-sample term (:func:`_einsum_spec`): ``L`` is ``g`` and
    ``R`` the data operand, each rearranged by a one-operand einsum and merged to
    ``[.., N, G, P, F]``; None for any other einsum (``batch_grad`` then computes it)."""
    def declare(g, c: Ctx) -> Optional[Contraction]:
        operands = [getattr(c.args, n) for n in EINSUM_OPERANDS if c.bound[n] is not None]
        inputs, output = parse_einsum(c.bound["equation"], len(operands))
        spec = _einsum_spec(inputs, output, index) if index < len(inputs) else None
        if spec is None:
            return None
        left, right, left_runs, right_runs, swap = spec
        lead = "".join(_fresh(inputs, output, c.lead))
        g = torch.einsum(f"{lead}{''.join(output)}->{lead}{''.join(left)}", g)
        data = torch.einsum(f"{''.join(inputs[1 - index])}->{''.join(right)}",
                            operands[1 - index])
        return Contraction(c.call(merge_axes, g, c.lead + 1, left_runs),
                           c.call(merge_axes, data, 1, right_runs),
                           operands[index], swap=swap)
    return declare


bilinear([torch.einsum], "einsum", "equation, " + ", ".join(
             f"{n}=None" if i else n for i, n in enumerate(EINSUM_OPERANDS)),
         tuple((EINSUM_OPERANDS[i], EINSUM_OPERANDS[j]) for i in range(4)
               for j in range(i + 1, 4)),
         traits=(VIEW,),  # "ij->ji" returns a view
         doc="y = einsum(eq, a, b, ...) (each operand's letters distinct);  ā = einsum with "
             "the equation rearranged, '<out>,<b>-><a>', plus fresh letters for lead axes.",
         vjp={n: (lambda i: lambda g, c: _einsum_transpose(g, c, i, False))(k)
              for k, n in enumerate(EINSUM_OPERANDS)},
         batch_grad={n: (lambda i: lambda g, c: _einsum_transpose(g, c, i, True))(k)
                     for k, n in enumerate(EINSUM_OPERANDS)},
         contraction={n: _einsum_contraction(k) for k, n in enumerate(EINSUM_OPERANDS)},
         unsupported=_einsum_unsupported, mixes_samples=_einsum_mixes,
         residual_block={(EINSUM_OPERANDS[i], EINSUM_OPERANDS[j]): _einsum_cross(i, j)
                         for i in range(4) for j in range(i + 1, 4)})


# -- bilinear layer (nn.Bilinear) -------------------------------------------------------------
def _bilinear_einsum(spec: str):
    """A rule ``(g, c) -> einsum(spec, g, ...)`` with ``spec``'s ``L`` standing for ``g``'s
    lead axes; the other operands are named after the arrow-free parts: ``w``, ``x1``, ``x2``."""
    def rule(g, c: Ctx):
        lead = string.ascii_uppercase[:c.lead]
        operands = {"w": c.args.weight, "x1": c.args.input1, "x2": c.args.input2}
        inputs, _, names = spec.partition("|")
        return torch.einsum(inputs.replace("L", lead), g,
                            *[operands[name] for name in names.split(",") if name])
    return rule


def _bilinear_cross(g, c: Ctx):
    """``C_n = Σ_out g ∂²f/∂x₁∂x₂`` ``[N, P·I₁, P·I₂]``: ``δ_pp' Σ_k g_npk W_kij`` (positions
    ``p`` flattened)."""
    rows = g.reshape(g.size(0), -1, g.size(-1))                                   # [N, P, O]
    cross = torch.einsum("npk,kij,pq->npiqj", rows, c.args.weight, c.call(axis_eye, rows, 1))
    return cross.reshape(g.size(0), c.args.input1[0].numel(), c.args.input2[0].numel())


bilinear([F.bilinear], "bilinear", "input1, input2, weight, bias=None",
         (("input1", "input2"), ("input1", "weight"), ("input2", "weight")), traits=(FRESH,),
         doc="y_k = x₁ᵀ W_k x₂ + b_k (x₁ [N, *, I₁], x₂ [N, *, I₂], W [O, I₁, I₂]);  "
             "x̄₁ = Σ_k g_k W_k x₂, x̄₂ = Σ_k g_k W_kᵀ x₁, W̄ = Σ g ⊗ x₁ ⊗ x₂, b̄ = Σ g; "
             "per sample without the sum over n; cross block of x₁, x₂: Σ_k g_k W_k.",
         vjp={"input1": _bilinear_einsum("L...k,kij,...j->L...i|w,x2"),
              "input2": _bilinear_einsum("L...k,kij,...i->L...j|w,x1"),
              "weight": _bilinear_einsum("L...k,...i,...j->Lkij|x1,x2"),
              "bias": _bilinear_einsum("L...k->Lk|")},
         batch_grad={"weight": _bilinear_einsum("Ln...k,n...i,n...j->Lnkij|x1,x2"),
                     "bias": _bilinear_einsum("Ln...k->Lnk|")},
         residual_block={("input1", "input2"): _bilinear_cross})


# -- attention ---------------------------------------------------------------------------------
def causal_blocked(queries: int, keys: int, device: torch.device) -> Tensor:
    """``[L, S]`` True above the diagonal: the keys a causal query may not attend to."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).triu(1)


def attention(q, k, v, mask=None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: Optional[float] = None):
    """``softmax(q kᵀ · scale + mask) v`` written on Proxies (it emits nodes into the graph
    ``q`` belongs to, when tracing a module or when lowering a node); ``mask`` is additive.
    Dropout draws one Bernoulli mask, as the dropout lowering does. Returns
    ``(out, weights)``, the weights ``[..., L, S]`` after dropout, as torch returns them."""
    scores = torch.matmul(q, k.transpose(-2, -1))
    scores = scores * (q.size(-1) ** -0.5 if scale is None else scale)
    if is_causal:
        blocked = q.tracer.create_proxy("call_function", causal_blocked,
                                        (q.size(-2), k.size(-2), q.device), {})
        scores = scores.masked_fill(blocked, float("-inf"))
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, -1)
    if dropout_p > 0:
        keep = torch.bernoulli(torch.full_like(weights, 1.0 - dropout_p))
        weights = weights * (keep / (1.0 - dropout_p))
    return torch.matmul(weights, v), weights


def sdpa_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An attention mask as an additive float mask: boolean True (attend) -> 0, False -> -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask.logical_not(), float("-inf"))
    return mask


affine([sdpa_mask], "sdpa_mask", "mask, dtype",
       doc="A boolean attention mask as an additive 0 / -inf mask (no derivative); a float one "
           "(a relative position bias, BEiT's) as it is;  Jᵀg = g.",
       vjp={"mask": lambda g, c: g, "dtype": None}, sandwich={"mask": "shared"})


def _lower_sdpa(c: Ctx):
    """``softmax(q kᵀ · scale + mask) v`` (:func:`attention`); a boolean ``attn_mask`` (True:
    attend) becomes an additive ``0 / -inf`` mask (:func:`sdpa_mask`); ``dropout_p > 0``
    draws a dropout mask on the weights (as torch does, in any mode); ``enable_gqa`` repeats
    each key/value head for its ``Hq / Hkv`` query heads (``repeat_interleave`` along -3)."""
    b = c.bound
    key, value = c.args.key, c.args.value
    if b["enable_gqa"]:  # each key/value head serves its group of query heads
        groups = c.args.query.size(-3) // key.size(-3)
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    mask = c.args.attn_mask
    if mask is not None:
        mask = c.call(sdpa_mask, mask, c.args.query.dtype)
    return attention(c.args.query, key, value, mask, b["dropout_p"], b["is_causal"],
                     b["scale"])[0]


register([F.scaled_dot_product_attention], "scaled_dot_product_attention",
         "query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, "
         "enable_gqa=False",
         doc=_lower_sdpa.__doc__, lower=_lower_sdpa)
