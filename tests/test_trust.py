"""What the symbolic trace cannot see never becomes a wrong number (issue 12, families 1-4).

Each case is ordinary PyTorch that fx records incompletely: attributes of results, in-place
ops on aliased memory, grad-mode regions, custom ``autograd.Function`` backward passes and
module hooks. fxcurv either matches eager autograd / ``torch.func`` in float64 or refuses at
compile time with a :class:`fxcurv.CompileError` naming the node and the user's line.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcurv

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


class Body(nn.Module):
    """``Linear(3, 4) -> f -> Linear(4, 2)`` with ``f`` the construct under test."""

    def __init__(self, f):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer, self.f = nn.Linear(3, 4), nn.Linear(4, 2), f
        self.to(DTYPE)

    def forward(self, x):
        return self.outer(self.f(self.inner(x)))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, dtype=DTYPE, generator=g), torch.randn(5, 2, dtype=DTYPE,
                                                                    generator=g)


def assert_matches_eager(model: nn.Module, loss_fn=None, quantities=("diag_h",)):
    """Loss and gradient equal eager autograd; ``diag_h`` equals torch.func's Hessian."""
    loss_fn = loss_fn or nn.MSELoss()
    x, y = batch()
    step = fxcurv.compile(model, loss_fn, list(quantities))
    loss, grad, *rest = step(x, y)
    params = dict(model.named_parameters())
    eager = loss_fn(model(x), y)
    torch.testing.assert_close(loss, eager, **TOL)
    expected = torch.autograd.grad(eager, list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), expected):
        torch.testing.assert_close(grad[name], torch.zeros_like(p) if g is None else g, **TOL)
    if "diag_h" in quantities:
        diag_h = rest[list(quantities).index("diag_h")]
        for name, p in params.items():
            torch.testing.assert_close(diag_h[name], hessian_diagonal(model, loss_fn, x, y, p),
                                       **TOL)


def hessian_diagonal(model, loss_fn, x, y, param):
    """The diagonal of ``param``'s Hessian block by eager double backward (which, unlike
    forward-mode ``torch.func.hessian``, honours ``no_grad`` and ``.data``)."""
    grad = torch.autograd.grad(loss_fn(model(x), y), param, create_graph=True)[0].reshape(-1)
    rows = [torch.autograd.grad(grad[i], param, retain_graph=True, allow_unused=True)[0]
            for i in range(grad.numel())]
    return torch.stack([torch.zeros(()) if r is None else r.reshape(-1)[i]
                        for i, r in enumerate(rows)]).reshape(param.shape)


def assert_refused(model: nn.Module, *fragments: str):
    with pytest.raises(fxcurv.CompileError) as info:
        fxcurv.compile(model, nn.MSELoss(), ["diag_h"])
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- 1. attributes of results ----------------------------------------------------------------
def test_fft_real_is_refused_not_a_zero_gradient():
    message = assert_refused(Body(lambda h: torch.fft.fft(h).real), "fft", "no rule")
    assert "test_trust.py" in message and "torch.fft.fft(h).real" in message


def test_real_of_a_ruled_result_is_refused():
    assert_refused(Body(lambda h: torch.tanh(h).real * 2), "'.real'", "diag_h")


def test_values_of_max_is_its_result_not_a_constant():
    assert_matches_eager(Body(lambda h: torch.max(h, 1, keepdim=True).values + h))


def test_fields_of_sort_and_topk_are_their_results():
    assert_matches_eager(Body(lambda h: h * torch.sort(h, 1).indices
                              + torch.topk(h, 4, 1, largest=False).values.tanh()))


def test_max_without_dim_is_refused():
    assert_refused(Body(lambda h: h * torch.max(h)), "no dim")


def test_named_fields_become_positions():
    from fxcurv.passes.normalize import normalize
    from fxcurv.trace import CurvatureTracer

    graph = CurvatureTracer().trace(lambda h: torch.max(h, 1).values + torch.topk(h, 2).indices)
    normalize(graph)
    picks = [(n.target, n.args[1]) for n in graph.nodes if n.op == "call_function"
             and n.target in (getattr, __import__("operator").getitem)]
    assert [index for _, index in picks] == [0, 1]
    assert all(target is not getattr for target, _ in picks)


def test_transposes_and_metadata_attributes_keep_working():
    def f(h):
        scale = h.shape[1] / h.ndim
        zeros = torch.zeros(h.shape, dtype=h.dtype, device=h.device)
        return (h.T.T * scale + zeros).unsqueeze(1).mT.squeeze(2) + h.data
    assert_matches_eager(Body(f))


# -- 2. in-place ops and aliasing ------------------------------------------------------------
def _scale_column_in_place(h):
    h = h * 1
    h[:, 0].mul_(2)  # mutates h in eager PyTorch
    return h


def _view_read_after_base_changes(h):
    v = h[:, :2]
    h.add_(1)  # v sees the change in eager PyTorch
    return torch.cat([v, v], 1)


def _earlier_in_place_result_read_later(h):
    h = h * 1
    y = h.add_(1)  # y is h
    h.mul_(2)
    return y


def _flatten_view_changed(h):
    flat = h.view(-1)
    flat.mul_(3)
    return h


@pytest.mark.parametrize("f", [_scale_column_in_place, _view_read_after_base_changes,
                               _earlier_in_place_result_read_later, _flatten_view_changed])
def test_in_place_seen_through_an_alias_is_refused(f):
    assert_refused(Body(f), "shares memory", "read afterwards", "test_trust.py")


def test_in_place_on_a_parameter_is_refused():
    model = Body(lambda h: h)
    model.forward = lambda x: model.outer(model.inner(x) + model.inner.bias.mul_(1.0))
    assert_refused(model, "inner.bias", "never mutates the model")


def test_in_place_without_out_of_place_rule_is_refused():
    def f(h):
        z = torch.zeros_like(h)
        z.fill_(1)  # dead-code removal would drop it: the step would multiply by zeros
        return h * z
    assert_refused(Body(f), "fill_", "no out-of-place rule")


def _assign_by_tensor_index(h):
    g = torch.zeros_like(h)
    g[:, torch.tensor([0, 2])] = h[:, :2]
    return g


def _assign_tensor_under_mask(h):
    g = h * 1
    g[h > 0] = h[h > 0] * 2
    return g


def _assign_into_a_sample(h):
    g = h * 1
    g[0] = 0.0
    return g


@pytest.mark.parametrize("f, fragments", [
    (_assign_by_tensor_index, ("setitem", "no out-of-place rule")),
    (_assign_tensor_under_mask, ("setitem", "no out-of-place rule")),
    (_assign_into_a_sample, ("it assigns into part of the sample axis 0",))],
    ids=["tensor_index", "tensor_under_mask", "into_a_sample"])
def test_item_assignments_without_an_exact_form_are_refused_at_compile_time(f, fragments):
    """An integer tensor index (duplicates make eager's order undefined), a tensor value
    under a boolean mask (its shape depends on the data), and a write into some samples' rows
    (for per-sample quantities) are refused, naming the node."""
    with pytest.raises(fxcurv.CompileError) as info:
        fxcurv.compile(Body(f), nn.MSELoss(), ["batch_grad"])
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_unaliased_in_place_ops_are_exact():
    def f(h):
        h = h * 1
        h += 0.5
        h = h.view(5, 2, 2)
        h.mul_(2)
        h = h.flatten(1)
        h.sub_(torch.ones_like(h))
        before = h.sigmoid()  # read before the next in-place op: keeps the old value
        h.mul_(3)
        return torch.tanh(h) + before
    assert_matches_eager(Body(f))


def test_positional_inplace_flag_is_made_functional():
    def f(h):
        a = h * 1
        b = F.elu(a, 1.0, True)  # a is overwritten: elu's derivative needs the old a
        return b * 2
    assert_matches_eager(Body(f))


# -- 3. grad mode ----------------------------------------------------------------------------
def _no_grad(h):
    with torch.no_grad():
        a = torch.tanh(h) * 2
    return h * a


def _set_grad_enabled(h):
    with torch.set_grad_enabled(False):
        a = h * h
    return torch.tanh(h) + a


def _set_grad_enabled_call(h):
    torch.set_grad_enabled(False)
    a = h.sigmoid()
    torch.set_grad_enabled(True)
    return h * a


def _inference_mode(h):
    with torch.inference_mode():
        a = h * 2
    return h * a.clone()


def _enable_grad_inside(h):
    with torch.no_grad():
        a = h.tanh()
        with torch.enable_grad():
            b = h * 3
    return a * b


def _no_grad_pieces(h):
    with torch.no_grad():
        pieces = h.chunk(2, 1)
    return h * torch.cat([pieces[1], pieces[0]], 1)


def _detach(h):
    return h * h.detach().tanh()


@pytest.mark.parametrize("f", [_no_grad, _set_grad_enabled, _set_grad_enabled_call,
                               _inference_mode, _enable_grad_inside, _no_grad_pieces, _detach])
def test_grad_mode_regions_are_constants(f):
    assert_matches_eager(Body(f))
    assert torch.is_grad_enabled()


def test_compiling_under_no_grad_still_differentiates_the_model():
    model = Body(torch.tanh)
    with torch.no_grad():
        step = fxcurv.compile(model, nn.MSELoss())
    x, y = batch()
    eager = torch.autograd.grad(nn.MSELoss()(model(x), y), model.inner.weight)[0]
    torch.testing.assert_close(step(x, y)[1]["inner.weight"], eager, **TOL)


# -- 4. custom autograd Functions ------------------------------------------------------------
class ScaledGradient(torch.autograd.Function):
    """Identity forward, gradient times 5 (a custom backward fx cannot see)."""

    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, g):
        return g * 5


def test_custom_function_on_the_parameter_path_is_refused():
    message = assert_refused(Body(ScaledGradient.apply), "ScaledGradient", "own backward")
    assert "test_trust.py" not in message or "ScaledGradient" in message


def test_custom_function_on_data_only_runs_as_is():
    model = Body(torch.tanh)
    inner = model.forward
    model.forward = lambda x: inner(ScaledGradient.apply(x) * 2)
    assert_matches_eager(model)


class MemoryEfficientSwish(torch.autograd.Function):
    """``x σ(x)`` saving only ``x``, its backward the exact derivative (efficientnet_pytorch's
    and timm's memory-efficient activations)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s))


def test_custom_function_differentiated_by_its_forward_when_asked():
    """``custom_functions="forward"``: every quantity is that of the forward's ops (here
    ``F.silu``); the refusal names the option; a backward that is not the forward's
    derivative fails the first-call check, where eager autograd runs it."""
    quantities = ["batch_grad", "diag_ggn_exact", "diag_h"]
    custom, plain = Body(MemoryEfficientSwish.apply), Body(F.silu)
    assert_refused(custom, "MemoryEfficientSwish", "custom_functions='forward'")
    x, y = batch()
    step = fxcurv.compile(custom, nn.MSELoss(), quantities, custom_functions="forward")
    got, expected = step(x, y), fxcurv.compile(plain, nn.MSELoss(), quantities)(x, y)
    scripted = torch.jit.script(step)(x, y)
    for name in got[3]:
        torch.testing.assert_close(scripted[3][name], got[3][name], msg=name)
    for value, reference in zip(got[1:], expected[1:]):
        for name in reference:
            torch.testing.assert_close(value[name], reference[name], **TOL, msg=name)
    step = fxcurv.compile(Body(ScaledGradient.apply), nn.MSELoss(), custom_functions="forward")
    with pytest.raises(fxcurv.StepError, match="first-call check"):
        step(x, y)
    with pytest.raises(fxcurv.CompileError, match="custom_functions must be"):
        fxcurv.compile(plain, nn.MSELoss(), custom_functions="trust")


# -- hooks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("register", [
    lambda m: m.register_full_backward_hook(lambda mod, gi, go: (gi[0] * 3,)),
    lambda m: m.register_full_backward_pre_hook(lambda mod, go: (go[0] * 3,)),
])
def test_backward_hooks_are_refused(register):
    model = Body(torch.tanh)
    register(model.outer)
    assert_refused(model, "backward hook", "outer (Linear)")


class BatchNormBody(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.bn, self.outer = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)
        self.to(DTYPE).eval()

    def forward(self, x):
        return self.outer(torch.tanh(self.bn(self.inner(x))))


@pytest.mark.parametrize("register", [
    lambda m: m.register_forward_hook(lambda mod, i, o: o * 2 + 1),
    lambda m: m.register_forward_pre_hook(lambda mod, i: (i[0].tanh(),)),
])
def test_forward_hooks_on_lowered_modules_run(register):
    model = BatchNormBody()
    register(model.bn)
    assert_matches_eager(model)
    register(model.inner)
    assert_matches_eager(model)


def test_in_place_under_no_grad_on_a_differentiable_value_is_refused():
    def f(h):
        h = h * 1
        with torch.no_grad():
            h.mul_(2)  # eager keeps h's derivative as if unchanged
        return h
    assert_refused(Body(f), "grad mode off")


def test_a_loss_cut_from_every_parameter_is_refused():
    model = Body(torch.tanh)
    model.forward = torch.no_grad()(model.forward)
    assert_refused(model, "depends on no trainable parameter")


def test_stack_of_a_whole_tuple_is_refused_at_compile_time():
    """Found by the fuzz test: the rule failed with a TypeError inside compile."""
    assert_refused(Body(lambda h: torch.stack(h.unbind(1), 1)), "one tuple value")


# -- the invariant's second half: what a rule calls constant has no derivative ---------------
def _constant_rules():
    from fxcurv.rules import RULES
    return sorted({(rule.name, target if isinstance(target, str) else target.__name__, target)
                   for target, rule in RULES.items() if rule.constant is True
                   # fxcurv's own index helpers: applied to integer index tensors only
                   and not getattr(target, "__module__", "").startswith("fxcurv")},
                  key=lambda item: item[:2])


@pytest.mark.parametrize("name, spelling, target", _constant_rules(),
                         ids=[f"{n}-{s}" for n, s, _ in _constant_rules()])
def test_constant_rules_have_no_derivative(name, spelling, target):
    """Every op a rule declares constant gives eager autograd no derivative either."""
    x = torch.randn(3, 4, dtype=DTYPE, requires_grad=True)
    call = getattr(torch.Tensor, target) if isinstance(target, str) else target
    first = x.sigmoid() if name == "bernoulli" else x
    second = 2.0 if name == "full_like" else x * 0.5
    out = None
    for args in ((first,), (first, second), (x > 0, second > 0)):  # unary, binary, logical
        try:
            out = call(*args)
            break
        except (TypeError, RuntimeError):
            continue
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        return
    if out.is_floating_point():
        grad = torch.autograd.grad((out * torch.randn_like(out)).sum(), x, allow_unused=True)[0]
        assert grad is None or not grad.abs().sum()


@pytest.mark.parametrize("attribute", sorted(__import__(
    "fxcurv.rules.shape", fromlist=["x"]).NO_DERIVATIVE_ATTRIBUTES))
def test_constant_attributes_have_no_derivative(attribute):
    value = getattr(torch.randn(3, 4, dtype=DTYPE, requires_grad=True) * 2, attribute)
    assert not (isinstance(value, torch.Tensor) and value.requires_grad)


@pytest.mark.parametrize("reduce", [
    lambda z: torch.linalg.vector_norm(z, dim=1, keepdim=True),
    lambda z: torch.norm(z, p=3, dim=1, keepdim=True),
    lambda z: z.std(1, keepdim=True),
], ids=["norm_2", "norm_3", "std"])
def test_norm_and_std_of_a_zero_vector_have_torchs_zero_subgradient(reduce):
    """``‖z‖`` and ``std(z)`` at ``z = 0`` (here ``z = h - h.detach()``: zero, with a
    derivative path): torch's backward gives the subgradient 0; before, the lowered
    ``√Σz²`` gave ``0/0 = nan`` in the gradient (with ``verify=False``, on every call)."""
    assert_matches_eager(Body(lambda h: h * (1 + reduce(h - h.detach()))),
                         quantities=("batch_grad",))


class TokensAsRows(nn.Module):
    """``[N, T, D]`` viewed as ``[N·T, D]`` rows for a linear layer, then back: each sample
    has ``T`` rows inside the model (``rows=False``: the same function on ``[N, T, D]``)."""

    def __init__(self, rows: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer = nn.Linear(3, 3), nn.Linear(3, 2)
        self.rows = rows
        self.to(DTYPE)

    def forward(self, x):
        if not self.rows:
            return self.outer(torch.tanh(self.inner(x)).mean(1))
        h = torch.tanh(self.inner(x.view(-1, 3))).view(x.size(0), -1, 3)
        return self.outer(h.mean(1))


@pytest.mark.parametrize("quantity", ["diag_h", "hmp"])
def test_a_reshape_of_the_sample_axis_inside_the_model_raises_when_the_step_runs(quantity):
    """Before: every quantity treated the ``N·T`` rows as samples (``diag_ggn_exact`` of
    ``inner.weight`` off by a third, ``batch_grad`` with 12 rows for 3 samples). The shape
    comes from the call's arguments, so the step checks each reshape inside the model when
    it runs; the Hessian family needs one row per sample and raises; the gradient alone
    needs no check."""
    x, y = torch.randn(3, 4, 3, dtype=DTYPE), torch.randn(3, 2, dtype=DTYPE)
    step = fxcurv.compile(TokensAsRows(), nn.MSELoss(), [quantity])
    vectors = {n: torch.randn(1, *p.shape, dtype=DTYPE)
               for n, p in TokensAsRows().named_parameters()}
    with pytest.raises(ValueError, match=r"node 'view' reshapes the sample axis 0 \(3 "
                                         r"samples, shape \[12, 3\] after\)"):
        step(x, y) if quantity == "diag_h" else step(x, y, vectors)
    model = TokensAsRows()
    _, grad = fxcurv.compile(model, nn.MSELoss(), [])(x, y)
    expected = torch.autograd.grad(nn.MSELoss()(model(x), y), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(grad[name], g, **TOL)


class RowsRepeated(nn.Module):
    """A parameter of two rows tiled over the batch: ``w.repeat(N // 2, 1)`` (sample ``n``
    meets row ``n % 2``) or, with ``per_sample``, ``w.repeat(N, 1)`` read as ``[N, 2, 3]``
    (whose rows a per-sample rule cannot tell from a copy per sample)."""

    def __init__(self, per_sample: bool = False):
        super().__init__()
        self.lin, self.w = nn.Linear(3, 3), nn.Parameter(torch.randn(2, 3))
        self.per_sample = per_sample

    def forward(self, x):
        if self.per_sample:
            tiled = self.w.repeat(x.shape[0], 1).reshape(x.shape[0], 2, 3).sum(1)
        else:
            tiled = self.w.repeat(x.shape[0] // 2, 1)
        return torch.tanh(self.lin(x) + tiled)


def test_a_parameter_tiled_over_the_samples_raises_for_per_sample_quantities():
    """A parameter copied once per sample (``probe.repeat(N, 1, 1)`` of a ``[1, 1, D]``
    probe: ``test_zoo.py``'s ``probe_pooling``) has per-sample gradients. Repeats that are
    not the number of samples are refused at compile time; a parameter of several rows
    repeated ``N`` times raises when the step runs (its rows' count is a size)."""
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.tensor([0, 1, 2, 0])
    with pytest.raises(fxcurv.CompileError, match="'repeat'.*repeats along the sample axis"):
        fxcurv.compile(RowsRepeated().to(DTYPE), nn.CrossEntropyLoss(), ["batch_grad"])
    step = fxcurv.compile(RowsRepeated(per_sample=True).to(DTYPE), nn.CrossEntropyLoss(),
                          ["batch_grad"])
    with pytest.raises(ValueError, match="along the sample axis of an x with 2 rows"):
        step(x, y)


def test_tokens_merged_into_rows_give_what_the_unmerged_model_gives():
    """Each sample's ``T`` rows add up to its own terms: the per-sample and GGN quantities
    equal those of the same function with the sample axis kept (``kflr`` too: its rows count
    as positions, the "expand" convention)."""
    x, y = torch.randn(3, 4, 3, dtype=DTYPE), torch.randn(3, 2, dtype=DTYPE)
    quantities = ["batch_grad", "batch_l2", "variance", "diag_ggn_exact",
                  "diag_ggn_exact_batch", "sqrt_ggn_exact", "kflr"]
    _, grad, *merged = fxcurv.compile(TokensAsRows(), nn.MSELoss(), quantities)(x, y)
    _, grad_kept, *kept = fxcurv.compile(TokensAsRows(rows=False), nn.MSELoss(),
                                         quantities)(x, y)
    torch.testing.assert_close(grad, grad_kept, **TOL)
    for quantity, ours, reference in zip(quantities, merged, kept):
        torch.testing.assert_close(ours, reference, **TOL, msg=quantity)


def test_a_reshape_that_keeps_the_samples_passes_its_check():
    """``x.view(-1, F)`` after a convolution (the classic LeNet) keeps axis 0's size: the
    check passes and the quantities are exact."""
    assert_matches_eager(Body(lambda h: h.view(-1, 2, 2).flatten(1) * 2))


class Positions(nn.Module):
    """Token and position embeddings, ``pos = arange(T)`` from ``x.size(1)`` on ``x``'s
    device (nanoGPT), a tanh layer, a head per token."""

    def __init__(self, vocab=7, length=4, width=3):
        super().__init__()
        torch.manual_seed(0)
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.inner, self.head = nn.Linear(width, width), nn.Linear(width, vocab)
        self.to(DTYPE)

    def forward(self, idx):
        _, length = idx.size()
        pos = torch.arange(0, length, dtype=torch.long, device=idx.device)
        return self.head(torch.tanh(self.inner(self.tokens(idx) + self.positions(pos))))


def _token_loss(logits, y):
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def _spatial_token_loss(logits, y):
    return F.cross_entropy(logits.transpose(1, 2), y)


def test_positions_built_from_a_later_axis_size_hold_no_samples():
    """``arange(x.size(1))`` was taken for data with a sample axis (it is computed from
    ``x``): the position table's per-sample gradients came out ``[T, ...]``, per position,
    not per sample. Sizes of later axes and metadata carry no samples."""
    model, gen = Positions(), torch.Generator().manual_seed(3)
    idx, y = torch.randint(0, 7, (3, 4), generator=gen), torch.randint(0, 7, (3, 4), generator=gen)
    _, _, batch_grad = fxcurv.compile(model, _token_loss, ["batch_grad"])(idx, y)
    _, _, diag = fxcurv.compile(model, _spatial_token_loss, ["diag_ggn_exact"])(idx, y)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(p, i, t):
        return _token_loss(torch.func.functional_call(model, p, (i[None],)), t[None]) / 3
    expected = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, idx, y)
    names, sizes = list(params), [p.numel() for p in params.values()]
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def logits_of(flat):
        pieces = {n: t.reshape(params[n].shape) for n, t in zip(names, flat.split(sizes))}
        return torch.func.functional_call(model, pieces, (idx,))
    logits = logits_of(theta).detach()
    hessian = torch.func.hessian(lambda z: _token_loss(z, y))(logits).reshape(logits.numel(), -1)
    jac = torch.func.jacrev(logits_of)(theta).reshape(logits.numel(), -1)
    ggn = dict(zip(names, torch.einsum("ip,ij,jp->p", jac, hessian, jac).split(sizes)))
    for name in names:
        torch.testing.assert_close(batch_grad[name], expected[name], **TOL)
        torch.testing.assert_close(diag[name].reshape(-1), ggn[name], **TOL)


def _flattened_token_loss(logits, y):
    return F.cross_entropy(logits.reshape(logits.size(0) * logits.size(1), -1), y.flatten())


@pytest.mark.parametrize("quantity", ["diag_ggn_exact", "kflr", "diag_h", "ggnmp"])
def test_a_loss_on_rows_that_merge_samples_raises_for_exact_curvature(quantity):
    """``cross_entropy(logits.reshape(N * T, -1), y.flatten())`` of ``[N, T, C]`` logits: before,
    the exact factor's columns of a sample's T rows were summed into one (``diag_ggn_exact``
    of the token table 86 % off). Exact curvature raises when the step runs and names the
    fix; per-sample gradients need no check (exact above)."""
    model = Positions()
    idx, y = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 4))
    vectors = {n: torch.randn(1, *p.shape, dtype=DTYPE) for n, p in model.named_parameters()}
    args = (idx, y, vectors) if quantity == "ggnmp" else (idx, y)
    with pytest.raises(ValueError, match=r"has 12 rows for 3 samples.*logits.transpose\(1, 2\)"):
        fxcurv.compile(model, _flattened_token_loss, [quantity])(*args)


@pytest.mark.parametrize("quantity", ["diag_ggn_exact", "kflr", "diag_h", "ggnmp",
                                      "sqrt_ggn_exact"])
@pytest.mark.parametrize("loss_fn", [_token_loss, lambda z, y: F.cross_entropy(
    z.flatten(0, 1), y.flatten())], ids=["view", "flatten"])
def test_a_loss_on_logits_viewed_as_rows_of_classes_is_exact(quantity, loss_fn):
    """nanoGPT's ``cross_entropy(logits.view(-1, C), y.view(-1))`` (and Hugging Face's shifted
    version) is the cross-entropy of ``logits.transpose(1, 2)`` against ``y``: the step puts
    the classes back on axis 1 (checking they were the last axis) and every exact quantity
    equals that of the ``[N, C, T]`` layout (before: a ``ValueError`` when the step ran, and
    for ``flatten(0, 1)`` silently wrong numbers: ``diag_ggn_exact`` 48 % off)."""
    model = Positions()
    idx, y = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 4))
    vectors = {n: torch.randn(1, *p.shape, dtype=DTYPE) for n, p in model.named_parameters()}
    args = (idx, y, vectors) if quantity == "ggnmp" else (idx, y)
    step = fxcurv.compile(model, loss_fn, [quantity])
    merged = step(*args)
    layout = fxcurv.compile(model, _spatial_token_loss, [quantity])(*args)
    scripted = torch.jit.script(step)(*args)
    for ours, expected in [*zip(merged, layout), *zip(scripted, merged)]:
        for a, b in zip(torch.utils._pytree.tree_leaves(ours),
                        torch.utils._pytree.tree_leaves(expected)):
            torch.testing.assert_close(a, b, **TOL)


def test_rows_of_classes_that_are_not_the_last_axis_raise():
    """``logits.view(-1, C)`` of ``[N, T·C]`` logits: the rows are not the entries of an axis,
    so exact curvature raises when the step runs."""
    def loss_fn(out, y):
        return F.cross_entropy(out.view(-1, 7), y.view(-1))

    model = nn.Sequential(nn.Linear(5, 14)).to(DTYPE)
    with pytest.raises(ValueError, match="viewed as rows of 7 classes, which are not its last"):
        fxcurv.compile(model, loss_fn, ["diag_ggn_exact"])(
            torch.randn(3, 5, dtype=DTYPE), torch.randint(0, 7, (3, 2)))


class NegativeAxis(nn.Module):
    """``op(h)`` of the hidden ``[N, T, D]`` (or ``[N, D]`` with ``flat``) values, where the
    op's negative axis argument is axis 0 at that rank."""

    def __init__(self, op, flat: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.op, self.flat = op, flat
        self.inner, self.outer = nn.Linear(3, 3), nn.LazyLinear(2)
        self.outer(op(torch.zeros(4, 3) if flat else torch.zeros(4, 5, 3)).flatten(1))
        self.to(DTYPE)

    def forward(self, x):
        h = torch.tanh(self.inner(x[:, 0] if self.flat else x))
        return self.outer(self.op(h).flatten(1))


@pytest.mark.parametrize("op, flat, what", [
    (lambda h: h.transpose(-3, -2).reshape(h.size(0), -1), False, "moves the sample axis"),
    (lambda h: h - h.mean(-2, keepdim=True), True, "reduces over the sample axis"),
    (lambda h: h[..., 0, :].unsqueeze(0).expand(h.size(0), -1), True, "indexes the sample"),
    (lambda h: torch.cumsum(h, -2), True, "accumulates along the sample axis"),
    (lambda h: torch.flip(h, (-2,)), True, "moves entries along the sample axis"),
    (lambda h: torch.softmax(h, -2), True, "normalises over the sample axis"),
    (lambda h: (h.mT * 2).mT, True, "moves the sample axis"),
    (lambda h: h.reshape(h.size(0), -1) - h.reshape(h.size(0), -1).mean(-2, keepdim=True),
     True, "reduces over the sample axis"),
])
def test_a_negative_axis_that_is_the_sample_axis_raises_when_the_step_runs(op, flat, what):
    """Before: ``transpose(-3, -2)`` of ``[N, T, D]``, ``mean(-2)`` of ``[N, D]``, ``x[..., 0,
    :]`` of ``[N, D]`` passed the compile-time check (which saw no axis 0) and per-sample
    quantities came out silently wrong (``batch_grad`` 95 % off for the transpose). Only the
    running step knows the rank, so it checks such axes; the gradient is exact."""
    x, y = torch.randn(4, 5, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    step = fxcurv.compile(NegativeAxis(op, flat), nn.MSELoss(), ["batch_grad"])
    with pytest.raises(ValueError, match=f"negative axis is the sample axis 0: it {what}"):
        step(x, y)
    model = NegativeAxis(op, flat)
    _, grad = fxcurv.compile(model, nn.MSELoss(), [])(x, y)
    expected = torch.autograd.grad(nn.MSELoss()(model(x), y), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(grad[name], g, **TOL)


def test_negative_axes_off_the_sample_axis_pass_their_check():
    """The same ops on ranks where the negative axis is not axis 0 are exact."""
    assert_matches_eager(Body(lambda h: h.unsqueeze(1).transpose(-1, -2).flatten(1) -
                              h[..., :].mean(-1, keepdim=True)))


@pytest.mark.parametrize("f, what", [
    (lambda h: torch.softmax(h, 0), "normalises over the sample axis 0"),
    (lambda h: F.log_softmax(h, dim=0), "normalises over the sample axis 0"),
    (lambda h: (h @ h.T) @ h, "reverses the axes, moving the sample axis 0"),
])
def test_ops_coupling_samples_are_refused_for_per_sample_quantities(f, what):
    """Before: a softmax over axis 0 and ``h @ h.T`` inside the model were not known to couple
    the samples, and ``batch_grad`` came out silently wrong (88 % off for the softmax)."""
    with pytest.raises(fxcurv.CompileError, match=what):
        fxcurv.compile(Body(f), nn.MSELoss(), ["batch_grad"])


class Stateful(nn.Module):
    """A forward that counts its calls, caches an activation and reassigns an EMA buffer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("ema", torch.zeros(4))
        self.calls, self.cached = 0, None
        self.to(DTYPE)

    def forward(self, x):
        self.calls += 1
        h = torch.tanh(self.inner(x))
        self.ema = 0.9 * self.ema + 0.1 * h.mean(0).detach()
        self.cached = h
        return self.outer(h + self.ema)


def test_tracing_leaves_the_model_as_it_was():
    """Before: compiling left Proxies in the model (``model.cached``, and the buffer ``ema``,
    after which the step failed with a TypeError). Tracing's assignments are undone; a
    reassigned buffer gets a warning (the step does not store it); the step is exact."""
    model = Stateful()
    with pytest.warns(UserWarning, match=r"reassigns the buffer\(s\) `ema`"):
        step = fxcurv.compile(model, nn.MSELoss())
    assert model.calls == 0 and model.cached is None
    assert isinstance(model.ema, torch.Tensor) and not model.ema.any()
    x, y = batch()
    loss, grad = step(x, y)
    assert not model.ema.any()
    eager = nn.MSELoss()(model(x), y)
    torch.testing.assert_close(loss, eager, **TOL)
    for (name, p), g in zip(model.named_parameters(),
                            torch.autograd.grad(eager, list(model.parameters()))):
        torch.testing.assert_close(grad[name], g, **TOL)


class CachedBias(nn.Module):
    """timm's EfficientFormer in eval mode: a parameter-derived bias cached in a dict on the
    first forward and reused after."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer = nn.Linear(3, 4), nn.Linear(4, 2)
        self.table = nn.Parameter(torch.randn(4))
        self.cache = {}
        self.to(DTYPE)

    def forward(self, x):
        if "bias" not in self.cache:
            self.cache["bias"] = self.table * 2
        return self.outer(torch.tanh(self.inner(x)) + self.cache["bias"])


def test_a_cache_filled_in_forward_is_emptied_after_tracing_and_checking():
    """Before: the first compile left a Proxy in ``model.cache`` (the next compile failed:
    a node of another graph) and the first-call check left a tensor whose graph was freed.
    Both are undone; each step recomputes the bias, so its derivative reaches ``table``."""
    model = CachedBias().eval()
    x, y = batch()
    for _ in range(2):
        _, grad = fxcurv.compile(model, nn.MSELoss(), ["batch_grad"])(x, y)[:2]
        assert model.cache == {}
    eager = nn.MSELoss()(model(x), y)
    model.cache.clear()
    for (name, p), g in zip(model.named_parameters(),
                            torch.autograd.grad(eager, list(model.parameters()))):
        torch.testing.assert_close(grad[name], g, **TOL)


@pytest.mark.parametrize("loss_fn, where", [
    (lambda z, y: F.cross_entropy(z @ z.T, y), "reverses the axes"),
    (lambda z, y: F.mse_loss(z - z.mean(0, keepdim=True), y.to(DTYPE)[:, None].expand(-1, 2)),
     "reduces over the sample axis"),
    (lambda z, y: F.cross_entropy(z.softmax(0), y), "normalises over the sample axis"),
])
def test_a_loss_that_couples_the_samples_is_refused(loss_fn, where):
    """A contrastive loss over ``z @ z.T``, a loss of batch-centred outputs: not a sum of
    per-sample terms. Before: ``diag_ggn_exact`` 180x off the full-batch GGN, per-sample
    gradients of terms that do not exist. Only the gradient is defined (and exact)."""
    model = Body(lambda h: h)
    with pytest.raises(fxcurv.CompileError, match=f"{where}.*loss couples the samples"):
        fxcurv.compile(model, loss_fn, ["diag_ggn_exact"])
    x, y = batch()[0], torch.tensor([1, 0, 1, 0, 1])
    _, grad = fxcurv.compile(model, loss_fn)(x, y)
    expected = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(grad[name], g, **TOL)


def test_a_mean_over_the_samples_that_only_linear_ops_follow_is_separable():
    """``((out - 1) ** 2).mean(0).sum()`` reduces over the samples, but only a sum follows: the
    loss is a sum of per-sample terms, and every quantity equals that of ``.sum() / N``;
    a square after the reduction couples them and is refused."""
    model = Body(torch.tanh)
    x, y = batch()
    quantities = ["diag_ggn_exact", "batch_grad", "diag_h"]
    ours = fxcurv.compile(model, lambda z, t: ((z - t) ** 2).mean(0).sum(), quantities)(x, y)
    plain = fxcurv.compile(model, lambda z, t: ((z - t) ** 2).sum() / z.shape[0],
                           quantities)(x, y)
    for got, want in zip(ours[2:], plain[2:]):
        for name in got:
            torch.testing.assert_close(got[name], want[name], **TOL)
    with pytest.raises(fxcurv.CompileError, match="loss couples the samples"):
        fxcurv.compile(model, lambda z, t: (((z - t) ** 2).sum(0) ** 2).sum(), quantities)


def _attribute_first_used_under_no_grad(h):
    t = h.T  # read with grad mode on; fx adds its node where it is first used
    with torch.no_grad():
        gate = torch.sigmoid(t)
    return (t * gate).T


def test_an_attribute_read_outside_no_grad_keeps_its_derivative():
    """Before: ``t = h.T`` first used inside ``torch.no_grad()`` was taken for a value of the
    region and detached where read outside it (the gradient wrong; the first-call check
    caught it, ``verify=False`` would not). The node now records the grad mode of the read."""
    assert_matches_eager(Body(_attribute_first_used_under_no_grad), quantities=())
