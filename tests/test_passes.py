"""Compile-time optimisations, each shown on the generated graph (with and without the pass,
or a request with and without the quantity):

1. one propagation shared by every quantity that needs it (``compile._extract`` memoises the
   sources; for exact factors CSE would also merge copies, sampled ones it cannot);
2. dead code: no input cotangent, nothing propagated below the first parameterised op
   (``backward`` emits only for values that depend on parameters), no unused node left
   (``cleanup.finalize``: DCE), no ``[N, *p]`` tensor for ``batch_l2`` / ``sum_grad_squared``
   of a linear layer (``PerSample._shortcut``);
3. contraction order for the shapes at hand (the Gram form of ``contraction_l2``);
4. intermediates freed early (``passes/schedule.py``: extractions next to their factors);
5. work moved to smaller tensors: ``max_pool(relu(z))`` -> ``relu(max_pool(z))``
   (``normalize.pool_before_relu``) and ReLU passes in place on temporaries
   (``cleanup.write_into_temporaries``).
"""
from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxcurv

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
N = 7


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 4 * 4, 6), nn.Tanh(),
                         nn.Linear(6, 3)).double()


def cnn_batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(N, 2, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (N,), generator=gen))


def compile_cnn(quantities, **kwargs):
    """The exact GGN propagation inline in the step (``column_chunk=None``), where these
    tests read it; chunked, it runs in a submodule (``test_chunking.py``)."""
    return fxcurv.compile(cnn(), nn.CrossEntropyLoss(), quantities,
                          **{"column_chunk": None, **kwargs})


def targets(step: fx.GraphModule) -> Counter:
    """How often each op is called in the step."""
    return Counter(getattr(n.target, "__name__", n.target) for n in step.graph.nodes
                   if n.op in ("call_function", "call_method"))


def tagged(step: fx.GraphModule, **tags) -> list[fx.Node]:
    """Nodes whose ``meta["fxcurv"]`` has all ``tags``."""
    return [n for n in step.graph.nodes
            if all(n.meta.get("fxcurv", {}).get(k) == v for k, v in tags.items())]


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return out


# ------------------------------------------------------------------ 1. shared propagations


def test_exact_factor_propagated_once_for_three_quantities():
    one = compile_cnn(["diag_ggn_exact"])
    three = compile_cnn(["diag_ggn_exact", "sqrt_ggn_exact", "kflr"])
    assert targets(three)["cross_entropy_sqrt_hessian"] == 1
    propagation = [len(tagged(s, pass_="backward")) for s in (one, three)]
    assert propagation[0] == propagation[1]


def test_sampled_factor_propagated_once_for_three_quantities():
    """Random draws are not merged by CSE: only the shared source gives one propagation."""
    one = compile_cnn(["diag_ggn_mc"])
    three = compile_cnn(["diag_ggn_mc", "sqrt_ggn_mc", "kfac"])
    assert targets(three)["cross_entropy_sqrt_hessian_mc"] == 1
    assert len(tagged(one, pass_="backward")) == len(tagged(three, pass_="backward"))
    x, y = cnn_batch()
    torch.manual_seed(0)
    _, _, diag, sqrt, _ = three(x, y)
    for name, value in diag.items():  # the diagonal and the factor come from the same draws
        torch.testing.assert_close(value, sqrt[name].square().sum([0, 1]))


# ------------------------------------------------------------------ 2. dead code


class Preprocessed(nn.Module):
    """``tanh(2x)`` before the first parameterised op: nothing to propagate there."""

    def __init__(self):
        super().__init__()
        self.net = cnn()

    def forward(self, x):
        return self.net(torch.tanh(x * 2.0))


@pytest.mark.parametrize("quantities", [[], ["diag_ggn_exact"], ["diag_h"]])
def test_no_propagation_below_the_first_parameterised_op(quantities):
    step = fxcurv.compile(Preprocessed(), nn.CrossEntropyLoss(), quantities)
    below = {"x", "x_checked", "mul", "tanh"}  # the model's own tanh is "tanh_1"
    assert below <= {n.name for n in step.graph.nodes if "fxcurv" not in n.meta}
    propagated = {n.meta["fxcurv"].get("node") for n in tagged(step, pass_="backward")}
    assert "conv2d" in propagated and not propagated & below  # no Jᵀ of tanh, mul, x
    assert not [n.name for n in step.graph.nodes for name in below  # e.g. tanh_cotangent
                if n.name.startswith((f"{name}_cotangent", f"{name}_sqrt_ggn", f"{name}_vjp"))]


@pytest.mark.parametrize("quantities", [["diag_ggn_exact"], ["kfac"], ["diag_h"]])
def test_no_dead_nodes(quantities):
    """Dead-code removal (``cleanup.finalize``): e.g. a sqrt-GGN propagation also gives every
    parameter a summed cotangent ``[C, *p]`` that no quantity reads; none is left."""
    step = compile_cnn(quantities)
    dead = [n.name for n in step.graph.nodes if not n.users and n.op not in ("output",
                                                                              "placeholder")]
    assert not dead


def mlp3d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()


@pytest.mark.parametrize("quantity", ["batch_l2", "sum_grad_squared"])
def test_no_per_sample_gradient_for_linear_norms(quantity):
    """``[N, O, I]`` appears for batch_grad, not for batch_l2 / sum_grad_squared."""
    x = torch.randn(N, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (N,))
    loss = nn.CrossEntropyLoss()
    per_sample = {(N, 5, 6), (N, 4, 5)}
    for request, expect in (([quantity], False), (["batch_grad"], True)):
        with Shapes() as seen:
            fxcurv.compile(mlp3d(), loss, request)(x, y)
        assert bool(per_sample & set(seen.shapes)) == expect, request


# ------------------------------------------------------------------ 3. contraction order


@pytest.mark.parametrize("positions, gram", [(2, True), (40, False)])
def test_batch_l2_contraction_order_follows_the_shapes(positions, gram):
    """Sequence input ``[N, T, I]``: ``T(O + I) < O·I`` takes the Gram form (``[N, T, T]``,
    no ``[N, O, I]``), else the explicit per-sample gradient; both equal ``vmap(grad)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Flatten(), nn.Linear(10 * positions, 3))
    model = model.double()
    x = torch.randn(N, positions, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(reduction="sum"), ["batch_l2"])
    with Shapes() as seen:
        batch_l2 = step(x, y)[2]["0.weight"]
    assert ((N, positions, positions) in seen.shapes) == gram
    assert ((N, 10, 12) in seen.shapes) == (not gram)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xn, yn):
        out = torch.func.functional_call(model, p, (xn[None],))
        return nn.functional.cross_entropy(out, yn[None], reduction="sum")

    grads = torch.func.vmap(torch.func.grad(sample_loss), (None, 0, 0))(params, x, y)
    torch.testing.assert_close(batch_l2, grads["0.weight"].square().sum([1, 2]))


# ------------------------------------------------------------------ 4. early frees


def peak_live_bytes(step: fx.GraphModule, *args) -> int:
    """Peak of the bytes held by the step's values when each is freed after its last use
    (as the GraphModule's code does); views and in-place results keep their base alive and
    cost nothing."""
    sizes: dict[fx.Node, int] = {}

    class Record(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            inputs = {id(a) for a in self.env.values() if isinstance(a, torch.Tensor)}
            fresh = isinstance(out, torch.Tensor) and not out._is_view() and node.op not in (
                "placeholder", "get_attr") and id(out) not in inputs
            sizes[node] = out.numel() * out.element_size() if fresh else (
                0 if isinstance(out, torch.Tensor) else None)
            return out

    Record(step).run(*args)
    nodes = list(step.graph.nodes)
    last = {n: i for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last[arg] = i
    for node in reversed(nodes):  # a value read through a view lives as long as the view
        for arg in node.all_input_nodes:
            if sizes.get(node) == 0 and node.op != "output":  # a view or in-place result
                last[arg] = max(last[arg], last[node])
    live, peak = 0, 0
    for i, node in enumerate(nodes):
        live += sizes.get(node) or 0
        peak = max(peak, live)
        live -= sum(sizes.get(n) or 0 for n in node.all_input_nodes if last[n] == i)
    return peak


def without_scheduling(monkeypatch, quantities):
    monkeypatch.setattr(sys.modules["fxcurv.compile"], "schedule_extractions",
                        lambda graph, model_output, in_place=(): None)
    step = compile_cnn(quantities)
    monkeypatch.undo()
    return step


@pytest.mark.parametrize("quantities, ratio", [
    (["diag_ggn_exact"], 0.97), (["batch_l2"], 0.97),
    # here the peak is at the first conv: not higher (diag_h: the tanh residual's one
    # propagation, both signs, peaks there with its masked parts; the exact factor's C - 1
    # columns lower the unscheduled order's peak below it: 284280 vs 271536 bytes)
    (["diag_h"], 1.05), (["kflr"], 1.0), (["kfac"], 1.0)])
def test_extractions_scheduled_next_to_their_factors(monkeypatch, quantities, ratio):
    """Each layer's factor dies once its quantities are extracted, not at the end: a lower
    peak of live values, the same results. (The ReLU passes stay out of place here, so the
    saving is the scheduler's alone; in place, they leave less to reorder in this small net.)"""
    monkeypatch.setattr(sys.modules["fxcurv.passes.cleanup"], "write_into_temporaries",
                        lambda graph: None)
    unscheduled = without_scheduling(monkeypatch, quantities)
    monkeypatch.setattr(sys.modules["fxcurv.passes.cleanup"], "write_into_temporaries",
                        lambda graph: None)
    scheduled = compile_cnn(quantities)
    x, y = cnn_batch()
    assert peak_live_bytes(scheduled, x, y) <= ratio * peak_live_bytes(unscheduled, x, y)
    torch.manual_seed(0)  # kfac: the same draws
    expected = unscheduled(x, y)
    torch.manual_seed(0)
    result = scheduled(x, y)
    for want, got in zip(expected[1:], result[1:]):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("quantities", [["sqrt_ggn_exact"], ["batch_grad"],
                                        ["diag_ggn_mc_batch"]])
def test_per_sample_sized_results_stay_at_the_end(monkeypatch, quantities):
    """``[*lead, N, *p]`` results are as big as the factors: hoisted, they would be alive
    through the rest of the propagation, so they (and what only they read) stay last."""
    assert without_scheduling(monkeypatch, quantities).code == compile_cnn(quantities).code


def test_forward_only_extractions_stay_after_the_propagation(monkeypatch):
    """kfac's input factors (forward values only, no extraction consumer) are not hoisted
    into the forward pass, where they would live through the whole backward."""
    scheduled = compile_cnn(["kfac"])
    order = {n: i for i, n in enumerate(scheduled.graph.nodes)}
    first_backward = min(order[n] for n in tagged(scheduled, pass_="backward"))
    extraction = tagged(scheduled, pass_="per_sample")
    assert extraction and all(order[n] > first_backward for n in extraction)


# ------------------------------------------------------------------ 5. smaller, fewer tensors


class ConvReluPool(nn.Module):
    """conv -> relu -> max-pool twice (the second pool with overlapping, padded windows);
    ``extra`` also reads the first ReLU's output elsewhere, which keeps that ReLU in place."""

    def __init__(self, extra: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.extra = extra
        self.conv1, self.conv2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        pooled = nn.functional.max_pool2d(h, 2)
        pooled = nn.functional.max_pool2d(torch.relu(self.conv2(pooled)), 3, 2, 1)
        out = self.head(pooled.flatten(1))
        return out + h.mean([1, 2, 3])[:, None] if self.extra else out


def relu_pool_batch():
    """Many windows entirely <= 0 and exact ties (zeros): where the two orders could differ."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, 2, 8, 8, generator=gen, dtype=torch.float64) - 0.5
    x[:, :, :4] = 0.0
    return x, torch.randint(0, 3, (N,), generator=gen)


@pytest.mark.parametrize("quantities", [["diag_ggn_exact"], ["diag_h", "kflr"],
                                        ["sqrt_ggn_exact", "batch_l2"]])
def test_relu_moves_after_max_pool(quantities):
    """The ReLUs read the pools' outputs (the pools read the convs), and every quantity
    equals that of the model as written (autograd's gradient, torch.func's GGN)."""
    model = ConvReluPool().double()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities)
    forward = {n.name: n for n in step.graph.nodes if "fxcurv" not in n.meta}
    relus = [n for n in forward.values() if getattr(n.target, "__name__", "") == "relu"]
    assert len(relus) == 2
    assert all("max_pool" in n.args[0].name for n in relus)
    x, y = relu_pool_batch()
    loss, grad, *_ = step(x, y)
    nn.CrossEntropyLoss()(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad, rtol=1e-12, atol=1e-14)
    unswapped = without_pool_swap(model, quantities)
    for want, got in zip(unswapped(x, y)[2:], step(x, y)[2:]):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


def without_pool_swap(model, quantities):
    module = sys.modules["fxcurv.compile"]
    original = module.pool_before_relu
    module.pool_before_relu = lambda graph, keep=(): graph
    try:
        return fxcurv.compile(model, nn.CrossEntropyLoss(), quantities)
    finally:
        module.pool_before_relu = original


@pytest.mark.parametrize("model, quantities, swapped", [
    (ConvReluPool(extra=True), ["diag_ggn_exact"], 1),  # the first ReLU has another reader
    (ConvReluPool(), ["kfra"], 0),  # KFRA's batch averages depend on the order
    (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2)), [], 0)])  # the output
def test_relu_stays_before_the_pool(model, quantities, swapped):
    loss = nn.CrossEntropyLoss() if not isinstance(model, nn.Sequential) else (
        lambda out, y: out.square().sum())
    step = fxcurv.compile(model.double(), loss, quantities)
    relus = [n for n in step.graph.nodes
             if "fxcurv" not in n.meta and getattr(n.target, "__name__", "") == "relu"]
    assert sum("max_pool" in n.args[0].name for n in relus) == swapped


def test_relu_passes_in_place_on_temporaries():
    """Every ReLU pass of the gradient and of the sqrt-GGN factor writes into its cotangent
    (``threshold_backward(..., grad_input=g)``); the values are unchanged (float64, against
    the out-of-place step) and the peak of live values is lower."""
    model = ConvReluPool().double()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"],
                          column_chunk=None)
    passes = [n for n in step.graph.nodes if n.target is torch.ops.aten.threshold_backward]
    assert len(passes) == 4 and all(n.kwargs["grad_input"] is n.args[0] for n in passes)
    module = sys.modules["fxcurv.passes.cleanup"]
    original = module.write_into_temporaries
    module.write_into_temporaries = lambda graph: None
    try:
        out_of_place = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"],
                          column_chunk=None)
    finally:
        module.write_into_temporaries = original
    assert not any(n.kwargs for n in out_of_place.graph.nodes
                   if n.target is torch.ops.aten.threshold_backward)
    x, y = relu_pool_batch()
    for want, got in zip(out_of_place(x, y)[1:], step(x, y)[1:]):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert peak_live_bytes(step, x, y) < 0.9 * peak_live_bytes(out_of_place, x, y)


def test_shared_cotangent_is_not_overwritten():
    """``relu(a) + a``: the sum's cotangent also flows to ``a`` directly, so the ReLU pass
    must not overwrite it (it stays ``threshold_backward``); gradients equal autograd's."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin1, self.lin2 = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            a = self.lin1(x)
            return self.lin2(torch.relu(a) + a)

    model = Residual().double()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"],
                          column_chunk=None)
    passes = [n for n in step.graph.nodes if n.target is torch.ops.aten.threshold_backward]
    assert len(passes) == 2 and not any(n.kwargs for n in passes)
    x = torch.randn(N, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    _, grad, diag = step(x, y)
    nn.CrossEntropyLoss()(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad)


def test_pool_inputs_die_in_the_forward():
    """The max-pool backward reads only its input's shape, taken right after the input is
    made (``cleanup.read_shapes_early``): the full-size conv outputs are freed before the
    backward pass starts."""
    step = fxcurv.compile(ConvReluPool().double(), nn.CrossEntropyLoss(), ["diag_ggn_exact"],
                          column_chunk=None)
    nodes = list(step.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    shapes = [n for n in nodes if n.target is getattr and n.args[1] == "shape"]
    assert shapes and all(order[n] == order[n.args[0]] + 1 for n in shapes)
    first_backward = min(order[n] for n in tagged(step, pass_="backward") if n not in shapes)
    convs = [n for n in nodes if "fxcurv" not in n.meta and n.target is torch.conv2d]
    assert len(convs) == 2
    assert all(max(order[u] for u in conv.users) < first_backward for conv in convs)


def test_variance_written_into_its_square_sum_only_when_nothing_else_reads_it():
    """``variance`` alone: each parameter's square sum is a temporary, overwritten in place
    (``cleanup.moments_in_place``); requested with ``sum_grad_squared``, it is returned too,
    so it stays intact. Both steps give the same values (float64, against vmap)."""
    alone = compile_cnn(["variance"])
    both = compile_cnn(["sum_grad_squared", "variance"])
    assert targets(alone)["variance_from_moments_"] == len(list(cnn().parameters()))
    assert targets(both)["variance_from_moments_"] == 0
    x, y = cnn_batch()
    model = cnn()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xn, yn):
        out = torch.func.functional_call(model, p, (xn[None],))
        return nn.functional.cross_entropy(out, yn[None])

    grads = torch.func.vmap(torch.func.grad(sample_loss), (None, 0, 0))(params, x, y)
    _, _, variance = alone(x, y)
    _, _, sum_squares, variance_too = both(x, y)
    for name, g in grads.items():  # BackPACK's scaling: g_n of the mean loss, g / N
        share = g / N
        torch.testing.assert_close(sum_squares[name], (share ** 2).sum(0))
        expected = ((share ** 2).sum(0) - share.sum(0) ** 2 / N) / N
        torch.testing.assert_close(variance[name], expected)
        torch.testing.assert_close(variance_too[name], expected)
