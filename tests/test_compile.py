"""The compile contract: what the step is, returns and generates (DESIGN.md §1)."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxcurv

FIRST_ORDER = ["batch_grad", "batch_l2", "sum_grad_squared", "variance"]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()


class FunctionalMLP(nn.Module):
    """The same network as :func:`mlp`, written with ``F.*`` and raw parameters."""

    def __init__(self, reference: nn.Sequential):
        super().__init__()
        self.w1 = nn.Parameter(reference[0].weight.detach().clone())
        self.b1 = nn.Parameter(reference[0].bias.detach().clone())
        self.w2 = nn.Parameter(reference[2].weight.detach().clone())
        self.b2 = nn.Parameter(reference[2].bias.detach().clone())

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,),
                                                                              generator=g)


def ops(step: fx.GraphModule) -> list:
    return [(n.op, n.target) for n in step.graph.nodes if n.op in ("call_function",
                                                                   "call_method")]


def test_step_is_a_graph_module_returning_loss_grad_and_quantities_in_order():
    model = mlp()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["variance", "grad_batch"])
    assert isinstance(step, fx.GraphModule)
    loss, grad, variance, grad_batch = step(*batch())
    names = [n for n, _ in model.named_parameters()]
    assert loss.shape == () and list(grad) == names == list(variance) == list(grad_batch)
    assert grad_batch["0.weight"].shape == (6, 4, 5) and variance["0.weight"].shape == (4, 5)


def test_no_quantities_gives_loss_and_grad_only():
    outputs = fxcurv.compile(mlp(), nn.CrossEntropyLoss())(*batch())
    assert len(outputs) == 2


def test_sequential_and_functional_models_compile_to_the_same_graph():
    reference = mlp()
    seq = fxcurv.compile(reference, nn.CrossEntropyLoss(), FIRST_ORDER)
    fun = fxcurv.compile(FunctionalMLP(reference), nn.CrossEntropyLoss(), FIRST_ORDER)
    assert [t for _, t in ops(seq) if t != "detach"] == [t for _, t in ops(fun) if t != "detach"]
    for a, b in zip(seq(*batch()), fun(*batch())):
        a = list(a.values()) if isinstance(a, dict) else [a]
        b = list(b.values()) if isinstance(b, dict) else [b]
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)


def test_generated_code_has_readable_names():
    code = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), FIRST_ORDER).code
    for name in ["linear0_weight", "relu_cotangent", "linear_1_cotangent", "linear0_weight_grad",
                 "linear0_weight_batch_grad", "linear2_bias_variance", "batch_size"]:
        assert name in code, name
    assert "_tensor_constant" not in code


def test_no_input_cotangent_and_nothing_below_the_first_parameterised_op():
    class Preprocessed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(torch.tanh(x * 2.0))

    step = fxcurv.compile(Preprocessed().double(), nn.CrossEntropyLoss())
    emitted = [n.name for n in step.graph.nodes if "fxcurv" in n.meta]
    assert not any(name.startswith(("tanh", "mul", "x_")) and "vjp" in name for name in emitted)
    assert "tanh_cotangent" not in step.code and "x_checked_cotangent" not in step.code


def test_batch_l2_of_a_linear_layer_does_not_build_per_sample_gradients():
    step = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), ["batch_l2", "sum_grad_squared"])
    names = [n.name for n in step.graph.nodes]
    assert not any(name.endswith("weight_batch_grad") for name in names)
    _, _, l2, sgs = step(*batch())
    _, _, bg = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), ["batch_grad"])(*batch())
    for name in bg:
        torch.testing.assert_close(l2[name], bg[name].flatten(1).square().sum(1), rtol=1e-10,
                                   atol=1e-14)
        torch.testing.assert_close(sgs[name], bg[name].square().sum(0), rtol=1e-10, atol=1e-14)


def test_common_subexpressions_are_shared():
    step = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), FIRST_ORDER)
    keys = [(n.op, n.target, str(n.args), str(n.kwargs)) for n in step.graph.nodes
            if n.op in ("call_function", "call_method") and n.target != torch.bernoulli]
    assert len(keys) == len(set(keys))


def test_in_place_ops_are_made_functional():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = self.fc1(x)
            alias = h
            h += x                       # operator.iadd: later readers see the sum
            h = F.relu(h, inplace=True)  # `alias` is overwritten too
            out = self.fc2(h)
            out.mul_(2.0)
            return out + alias.sum(1, keepdim=True)

    model = InPlace().double()
    x, y = batch()
    loss, grad = fxcurv.compile(model, nn.CrossEntropyLoss())(x, y)
    reference = nn.CrossEntropyLoss()(model(x.clone()), y)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad, rtol=1e-10, atol=1e-14)


def test_train_mode_dropout_reuses_its_mask_in_the_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.4), nn.Linear(8, 3)).double().train()
    x, y = batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    assert "bernoulli" in step.code
    torch.manual_seed(3)
    loss, grad, batch_grad = step(x, y)
    torch.manual_seed(3)  # replay the same mask by hand, then differentiate with autograd
    h = model[0](x)
    keep = torch.bernoulli(torch.full_like(h, 0.6))
    reference = nn.CrossEntropyLoss()(model[2](h * (keep / 0.6)), y)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(batch_grad[name].sum(0), p.grad, rtol=1e-10, atol=1e-14)


FEATURE_DROPOUTS = {"dropout1d": (nn.Dropout1d, nn.Conv1d, (6, 2, 7)),
                    "dropout2d": (nn.Dropout2d, nn.Conv2d, (6, 2, 5, 5)),
                    "dropout3d": (nn.Dropout3d, nn.Conv3d, (6, 2, 3, 3, 3)),
                    "alpha_dropout": (nn.AlphaDropout, nn.Conv2d, (6, 2, 5, 5)),
                    "feature_alpha_dropout": (nn.FeatureAlphaDropout, nn.Conv2d, (6, 2, 5, 5))}


@pytest.mark.parametrize("kind", list(FEATURE_DROPOUTS))
def test_train_mode_dropout_variants_match_torch_with_the_same_seed(kind):
    """Channel-wise (``Dropout1d/2d/3d``) and alpha dropout (before: refused, no rule) draw
    their masks as torch does: with the same seed, loss and gradient equal eager autograd's,
    and the per-sample gradients sum to the gradient."""
    dropout, conv, shape = FEATURE_DROPOUTS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 4, 3), dropout(0.4), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(*shape, dtype=torch.float64)
    model = model.double().train()
    model(x)  # materialise the lazy layer
    y = torch.randint(0, 3, (shape[0],))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    torch.manual_seed(3)
    loss, grad, batch_grad = step(x, y)
    torch.manual_seed(3)
    reference = nn.CrossEntropyLoss()(model(x), y)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(batch_grad[name].sum(0), p.grad, rtol=1e-10, atol=1e-14)
    assert "dropout" not in fxcurv.compile(model.eval(), nn.CrossEntropyLoss()).code


def _timm_drop_path(x, drop_prob: float, training: bool):
    """timm's ``drop_path`` (``timm/layers/drop.py``): a per-sample mask by an in-place fill of
    a new tensor."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        random_tensor.div_(keep_prob)
    return x * random_tensor


def _floor_drop_path(x, drop_prob: float, training: bool):
    """The older form: ``(keep + rand).floor_()``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPathBlock(nn.Module):
    """A residual block with drop path and a layer-scale parameter, as in timm's ViT."""

    def __init__(self, drop_path):
        super().__init__()
        self.fc, self.drop_path = nn.Linear(8, 8), drop_path
        self.gamma = nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x):
        return x + self.drop_path(self.gamma * torch.tanh(self.fc(x)), 0.5, self.training)


@pytest.mark.parametrize("drop_path", [_timm_drop_path, _floor_drop_path],
                         ids=["new_empty_bernoulli_", "rand_floor_"])
def test_drop_path_masks_match_torch_with_the_same_seed(drop_path):
    """timm-style stochastic depth (before: refused, an in-place fill of ``new_empty``'s result,
    an op without a rule; ``floor_`` had no rule) draws its per-sample mask as eager does:
    loss, gradient and each per-sample gradient equal autograd's with the same seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), DropPathBlock(drop_path), DropPathBlock(drop_path),
                          nn.Linear(8, 3)).double().train()
    x, y = batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad", "kfac"])
    torch.manual_seed(3)
    loss, grad, batch_grad, kfac = step(x, y)
    assert all(torch.isfinite(f).all() for factors in kfac.values() for f in factors)
    torch.manual_seed(3)
    outputs = model(x)
    losses = nn.CrossEntropyLoss(reduction="none")(outputs, y) / len(y)
    torch.testing.assert_close(loss, losses.sum().detach(), rtol=1e-12, atol=0)
    params = dict(model.named_parameters())
    dropped = 0
    for n in range(len(y)):
        per_sample = torch.autograd.grad(losses[n], list(params.values()), retain_graph=True)
        dropped += int(per_sample[list(params).index("1.gamma")].abs().sum() == 0)
        for name, expected in zip(params, per_sample):
            torch.testing.assert_close(batch_grad[name][n], expected, rtol=1e-10, atol=1e-14)
    assert 0 < dropped < len(y)  # (the seed drops some samples' branch and keeps others)
    for name, p in params.items():
        torch.testing.assert_close(grad[name], batch_grad[name].sum(0), rtol=1e-10, atol=1e-14)


class MixedPrecision(nn.Module):
    """A float64 model computing a branch in float32 and converting back (HF's RMSNorm
    pattern: ``h.to(torch.float32)`` ... ``.to(input_dtype)``), with ``type_as`` and
    ``.to(other)``; before: ``to`` had no rule."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        low = torch.tanh(h.to(torch.float32)).to(dtype=x.dtype)
        return self.head(low.type_as(h) + h.float().to(h) * 0.5)


def test_dtype_conversions_differentiate_like_autograd():
    """Per-sample gradients through float32 conversions equal torch.func's (which rounds the
    same way); integer conversions are in the generic rule test (no derivative)."""
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    model, loss_fn = MixedPrecision().double(), nn.CrossEntropyLoss()
    x, y = batch()
    _, _, batch_grad = fxcurv.compile(model, loss_fn, ["batch_grad"])(x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xn, yn):
        return loss_fn(functional_call(model, p, (xn[None],)), yn[None]) / len(y)

    expected = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    for name in params:
        torch.testing.assert_close(batch_grad[name], expected[name], rtol=1e-10, atol=1e-14)


def test_rrelu_uses_the_mean_slope_in_eval_and_one_draw_per_call_in_train_mode():
    """RReLU (before: refused): eval mode is leaky ReLU with slope (l + u)/2; train mode
    draws a slope in [l, u] per negative entry once per call, and the backward uses it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.RReLU(0.1, 0.3), nn.Linear(8, 3)).double()
    x, y = batch()
    step = fxcurv.compile(model.eval(), nn.CrossEntropyLoss())
    assert "leaky_relu" in step.code
    _, grad = step(x, y)
    nn.CrossEntropyLoss()(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad, rtol=1e-10, atol=1e-14)
    model.zero_grad()
    step = fxcurv.compile(model.train(), nn.CrossEntropyLoss(), ["batch_grad"])
    torch.manual_seed(3)
    loss, grad, batch_grad = step(x, y)
    torch.manual_seed(3)  # replay the slopes by hand, then differentiate with autograd
    h = model[0](x)
    drawn = torch.empty_like(h).uniform_(0.1, 0.3)
    assert ((drawn >= 0.1) & (drawn <= 0.3)).all()
    reference = nn.CrossEntropyLoss()(model[2](h * torch.where(h > 0, 1.0, drawn)), y)
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(batch_grad[name].sum(0), p.grad, rtol=1e-10, atol=1e-14)


def test_eval_mode_dropout_is_removed():
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.4), nn.Linear(8, 3)).double().eval()
    step = fxcurv.compile(model, nn.CrossEntropyLoss())
    assert "dropout" not in step.code and "bernoulli" not in step.code


def test_unused_parameter_gets_zeros():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.spare = nn.Linear(5, 3), nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)

    _, grad, bg = fxcurv.compile(Unused().double(), nn.CrossEntropyLoss(), ["batch_grad"])(
        *batch())
    assert torch.equal(grad["spare.weight"], torch.zeros(2, 2, dtype=torch.float64))
    assert bg["spare.bias"].shape == (6, 2) and not bg["spare.bias"].any()


def test_frozen_parameters_are_left_out():
    model = mlp()
    model[0].requires_grad_(False)
    _, grad = fxcurv.compile(model, nn.CrossEntropyLoss())(*batch())
    assert list(grad) == ["2.weight", "2.bias"]


class CompiledInside(nn.Module):
    """A model with a submodule compiled by ``torch.compile`` (``self.body``)."""

    def __init__(self):
        super().__init__()
        self.body = torch.compile(mlp(), backend="eager")  # (dynamo without inductor: fast)

    def forward(self, x):
        return torch.tanh(self.body(x))


WRAPPED = {
    "torch.compile": lambda: torch.compile(mlp(), backend="eager"),
    "DataParallel": lambda: nn.DataParallel(mlp()),
    "torch.compile(DataParallel)": lambda: torch.compile(nn.DataParallel(mlp()),
                                                         backend="eager"),
    "compiled submodule": CompiledInside,
}


@pytest.mark.parametrize("wrap", WRAPPED.values(), ids=WRAPPED.keys())
def test_wrapped_models_compile_the_module_they_run(wrap):
    """``torch.compile``'s ``OptimizedModule`` (fx cannot trace dynamo) and ``nn.DataParallel``
    (a batch split the step does not need) are traced through to the module they run, under
    the wrapper's parameter names (``_orig_mod.0.weight``, ``module.0.weight``); before, a
    CompileError and a RuntimeError of the first-call check."""
    model = wrap()
    x, y = batch()
    _, grad, diag = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"])(x, y)
    names, params = zip(*model.named_parameters())
    assert list(grad) == list(names) and list(diag) == list(names)
    eager = torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), params)
    for name, expected in zip(names, eager):
        torch.testing.assert_close(grad[name], expected, msg=name)


def test_distributed_data_parallel_is_refused_naming_what_to_compile():
    """DDP all-reduces gradients in autograd hooks, which a step does not run: refused rather
    than returning the local gradient."""
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = mlp()
    with pytest.raises(fxcurv.CompileError, match=r"DistributedDataParallel.*process_group"):
        fxcurv.compile(ddp, nn.CrossEntropyLoss())


class Checkpointed(nn.Module):
    """``mlp()``'s layers behind an embedding, the hidden ones under
    ``torch.utils.checkpoint.checkpoint`` (``reentrant``: the autograd.Function version), or
    not at all."""

    def __init__(self, reentrant):
        super().__init__()
        self.embed, self.body, self.reentrant = nn.Linear(5, 5), mlp(), reentrant

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        if self.reentrant is None:
            return self.body(h)
        return torch.utils.checkpoint.checkpoint(self.body, h, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_has_the_derivatives_of_the_checkpointed_function(reentrant):
    """A checkpointed call's backward recomputes its forward: every quantity is that of the
    plain model (before, with ``use_reentrant=True``: refused as a custom autograd.Function).
    The first-call check runs eager autograd by ``backward`` there, as ``grad`` is refused."""
    torch.manual_seed(0)
    plain = Checkpointed(None).double()
    checkpointed = Checkpointed(reentrant).double()
    checkpointed.load_state_dict(plain.state_dict())
    quantities = ["batch_grad", "diag_ggn_exact", "diag_h"]
    expected = fxcurv.compile(plain, nn.CrossEntropyLoss(), quantities)(*batch())
    got = fxcurv.compile(checkpointed, nn.CrossEntropyLoss(), quantities)(*batch())
    for value, reference in zip(got[1:], expected[1:]):
        for name in reference:
            torch.testing.assert_close(value[name], reference[name], msg=name)
    assert all(p.grad is None for p in checkpointed.parameters())  # the check left none


def test_post_loss_arithmetic_and_callable_loss():
    model = mlp()
    x, y = batch()

    def loss_fn(out, target):
        return 2.0 * F.cross_entropy(out, target) + 0.5 * (out ** 2).mean()

    loss, grad = fxcurv.compile(model, loss_fn)(x, y)
    loss_fn(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad, rtol=1e-10, atol=1e-14)


def test_submodules_named_like_step_attributes():
    """Submodules called ``graph``, ``meta`` and a parameter called ``code`` (attributes every
    GraphModule has) are held by the step under ``model.`` and keep their names in the
    results; TorchScript and the replaced-parameter guard still work."""
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.graph, self.meta = nn.Linear(3, 4), nn.Linear(4, 2)
            self.code = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.meta(torch.tanh(self.graph(x))) * self.code

    model = Named().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    loss, grad, batch_grad = step(x, y)
    expected = nn.CrossEntropyLoss()(model(x), y)
    expected.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grad[name], param.grad)
        assert batch_grad[name].shape == (5, *param.shape)
    torch.testing.assert_close(torch.jit.script(step)(x, y)[0], loss)
    model.graph = nn.Linear(3, 4).double()
    with pytest.raises(fxcurv.StepError, match="graph.weight"):
        step(x, y)
