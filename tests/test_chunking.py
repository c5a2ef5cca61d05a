"""The exact GGN factor propagated in chunks of columns (``compile(..., column_chunk=...)``,
``passes/chunking.py``): every chunk size gives the unchunked results (float64: sums equal
up to rounding), the budget picks chunks at run time, and
TorchScript and ``torch.export`` keep working."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import fxcurv
from fxcurv import CompileError

DTYPE = torch.float64
QUANTITIES = ["diag_ggn_exact", "diag_ggn_exact_batch", "sqrt_ggn_exact", "kflr", "diag_h"]
CLASSES = 7


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4, CLASSES)).to(DTYPE)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, CLASSES)).to(DTYPE)


MODELS = {"cnn": (cnn, (2, 6, 6)), "mlp": (mlp, (6,))}


def batch(model: str, n: int):
    gen = torch.Generator().manual_seed(n)
    return (torch.randn(n, *MODELS[model][1], dtype=DTYPE, generator=gen),
            torch.randint(0, CLASSES, (n,), generator=gen))


def flat(outputs):
    for value in outputs:
        if isinstance(value, dict):
            for item in value.values():
                yield from (item if isinstance(item, list) else [item])
        else:
            yield value


def assert_same(result, expected) -> None:
    for got, want in zip(flat(result), flat(expected)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def calls(step: torch.fx.GraphModule) -> list:
    """Record the column count of every chunk the step's body runs on."""
    seen = []
    step.sqrt_ggn_exact_chunks.body.register_forward_hook(
        lambda module, args, out: seen.append(args[0].size(0)))
    return seen


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("chunk", [1, 3, CLASSES, 100])
def test_chunked_equals_unchunked(model, chunk):
    net, x_y = MODELS[model][0](), batch(model, 5)
    expected = fxcurv.compile(net, nn.CrossEntropyLoss(), QUANTITIES, column_chunk=None)(*x_y)
    step = fxcurv.compile(net, nn.CrossEntropyLoss(), QUANTITIES, column_chunk=chunk)
    seen = calls(step)
    result = step(*x_y)
    assert seen == ([CLASSES] if chunk >= CLASSES else
                    [min(chunk, CLASSES - start) for start in range(0, CLASSES, chunk)])
    assert_same(result, expected)


@pytest.mark.parametrize("budget, expected", [(1 << 30, [CLASSES]), (1, [1] * CLASSES)])
def test_the_budget_picks_the_chunk_at_run_time(budget, expected):
    net, x_y = cnn(), batch("cnn", 4)
    reference = fxcurv.compile(net, nn.CrossEntropyLoss(), QUANTITIES, column_chunk=None)
    step = fxcurv.compile(net, nn.CrossEntropyLoss(), QUANTITIES, column_budget=budget)
    seen = calls(step)
    assert_same(step(*x_y), reference(*x_y))
    assert seen == expected


def test_budget_scales_with_the_batch():
    """Four copies of the largest [N, ...] value the propagation reads (the input [N, 6]) per
    column: a budget of two columns at N = 4 is one column at N = 8."""
    per_column = 4 * 6 * 8  # copies * per-sample entries * bytes, per sample
    step = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), ["diag_ggn_exact"],
                          column_budget=2 * 4 * per_column)
    seen = calls(step)
    step(*batch("mlp", 4))
    step(*batch("mlp", 8))
    columns = CLASSES - 1  # cross-entropy's exact factor: C - 1 columns for diag_ggn_exact
    assert seen == [2] * (columns // 2) + [1] * (columns % 2) + [1] * columns


def test_ggnmp_and_hmp_chunked():
    net, (x, y) = mlp(), batch("mlp", 5)
    vectors = {n: torch.randn(2, *p.shape, dtype=DTYPE) for n, p in net.named_parameters()}
    quantities = ["ggnmp", "hmp"]
    expected = fxcurv.compile(net, nn.CrossEntropyLoss(), quantities,
                              column_chunk=None)(x, y, vectors)
    assert_same(fxcurv.compile(net, nn.CrossEntropyLoss(), quantities,
                               column_chunk=2)(x, y, vectors), expected)


def test_torchscript_runs_the_chunks(tmp_path):
    net, x_y = cnn(), batch("cnn", 5)
    step = fxcurv.compile(net, nn.CrossEntropyLoss(), QUANTITIES, column_budget=1)
    path = tmp_path / "step.pt"
    torch.jit.script(step).save(str(path))
    assert_same(torch.jit.load(str(path))(*x_y), step(*x_y))


@pytest.mark.dynamic_export
@pytest.mark.parametrize("chunk", ["auto", 3])
def test_export_with_a_dynamic_batch(chunk):
    step = fxcurv.compile(cnn(), nn.CrossEntropyLoss(), ["diag_ggn_exact", "sqrt_ggn_exact"],
                          column_chunk=chunk)
    samples = Dim("samples", min=2)
    exported = torch.export.export(step, batch("cnn", 4),
                                   dynamic_shapes={"x": {0: samples}, "y": {0: samples}})
    for n in (4, 7):
        assert_same(exported.module()(*batch("cnn", n)), step(*batch("cnn", n)))


def test_without_an_exact_factor_nothing_is_chunked():
    step = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), ["diag_ggn_mc", "batch_grad"])
    assert not hasattr(step, "sqrt_ggn_exact_chunks")


@pytest.mark.parametrize("options", [{"column_chunk": 0}, {"column_chunk": "all"},
                                     {"column_chunk": True}, {"column_budget": 0},
                                     {"column_budget": 1.5}])
def test_bad_options_fail_in_compile(options):
    with pytest.raises(CompileError, match="column_"):
        fxcurv.compile(mlp(), nn.CrossEntropyLoss(), ["diag_ggn_exact"], **options)
