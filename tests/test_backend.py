"""``fxcurv.compile(..., backend=...)``: the step run through ``torch.compile`` gives the plain
step's results (float64 ``aot_eager``: equal up to rounding; float32 ``inductor``: within
tolerance), for several batch sizes; ``step.code`` stays readable, ``torch.jit.script`` scripts
the plain code, and an unknown backend fails in ``compile``. Compiled steps are shared per
module (compiling is slow); inductor compiles one model holding every op of the others."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn

import fxcurv
import fxcurv.backend as fxcurv_backend
from fxcurv import CompileError
from fxcurv.backend import auto_backend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

QUANTITIES = ["batch_l2", "diag_ggn_exact", "kflr", "kfac"]
HAS_CXX = shutil.which("g++") or shutil.which("gcc") or shutil.which("clang++")
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="torch.compile's inductor backend needs a "
                               "C++ compiler (g++, gcc or clang++) on CPU; none found")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    """Conv, ReLU, max-pool, and the MLP's ops (linear, tanh) after them."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 8), nn.Tanh(), nn.Linear(8, 3))


MODELS = {"mlp": (mlp, (6,)), "cnn": (cnn, (2, 4, 4))}


def batch(model: str, n: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, *MODELS[model][1], generator=gen, dtype=dtype)
    return x, torch.randint(0, 3, (n,), generator=gen)


def build(model: str, dtype: torch.dtype, backend):
    torch.manual_seed(0)
    net = MODELS[model][0]().to(dtype)
    return fxcurv.compile(net, nn.CrossEntropyLoss(), QUANTITIES, backend=backend), \
        fxcurv.compile(net, nn.CrossEntropyLoss(), QUANTITIES)


def run(step, x, y, seed: int = 3):
    torch.manual_seed(seed)  # kfac samples: the same draws in both steps
    return step(x, y)


def assert_same(result, expected, rtol: float, atol: float) -> None:
    torch.testing.assert_close(result[0], expected[0], rtol=rtol, atol=atol)
    for got, want in zip(result[1:], expected[1:]):
        assert list(got) == list(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol)


@pytest.fixture(scope="module", params=list(MODELS))
def aot_eager64(request):
    return request.param, *build(request.param, torch.float64, "aot_eager")


@pytest.fixture(scope="module")
def inductor32():
    if not HAS_CXX:
        pytest.skip("inductor needs a C++ compiler (g++, gcc or clang++); none found")
    name = "cnn"
    step, plain = build(name, torch.float32, "inductor")
    with torch._inductor.config.patch(fallback_random=True):  # kfac: eager torch's draws
        first = run(step, *batch(name, 8, torch.float32))
    return name, step, plain, first


@pytest.mark.parametrize("n", [8, 5, 11])
def test_aot_eager_float64_matches_plain(aot_eager64, n):
    name, step, plain = aot_eager64
    x, y = batch(name, n, torch.float64)
    assert_same(run(step, x, y), run(plain, x, y), rtol=1e-12, atol=1e-14)


@needs_cxx
def test_inductor_float32_matches_plain(inductor32):
    name, step, plain, first = inductor32
    assert_same(first, run(plain, *batch(name, 8, torch.float32)), rtol=1e-4, atol=1e-6)


@needs_cxx
def test_inductor_other_batch_sizes(inductor32):
    """A new batch size recompiles (at most once, then the batch axis is dynamic)."""
    name, step, plain, _ = inductor32
    for n in (5, 11):
        x, y = batch(name, n, torch.float32)
        got, want = step(x, y), plain(x, y)
        assert_same(got[:4], want[:4], rtol=1e-4, atol=1e-6)  # kfac: inductor's own draws
        assert [v.shape for v in got[5]["0.weight"]] == [v.shape for v in want[5]["0.weight"]]


def test_compiled_step_stays_readable_and_scriptable(aot_eager64):
    name, step, plain = aot_eager64
    assert isinstance(step, torch.fx.GraphModule)
    assert step.code == plain.code and "def forward(self, x, y)" in step.code
    assert step.meta["fxcurv"]["backend"] == "aot_eager"
    scripted = torch.jit.script(step)
    x, y = batch(name, 6, torch.float64)
    assert_same(run(scripted, x, y), run(plain, x, y), rtol=1e-12, atol=1e-14)


def test_default_backend_is_the_plain_module():
    step = fxcurv.compile(mlp(), nn.CrossEntropyLoss())
    assert "forward" not in vars(step) and "backend" not in step.meta["fxcurv"]


@pytest.mark.parametrize("backend", ["no_such_backend", 3])
def test_unknown_backend_is_a_compile_error(backend):
    with pytest.raises(CompileError, match="is not a torch.compile backend"):
        fxcurv.compile(mlp(), nn.CrossEntropyLoss(), ["batch_l2"], backend=backend)


CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize("device, random, distributed, triton, expected", [
    (CPU, False, False, True, (None, None)),
    (CPU, True, True, True, (None, None)),
    (CUDA, False, False, True, ("inductor", "reduce-overhead")),
    (CUDA, True, False, True, ("inductor", None)),
    (CUDA, False, True, True, ("inductor", None)),
    (CUDA, False, False, False, (None, None)),
])
def test_auto_backend_decision(device, random, distributed, triton, expected):
    """``backend="auto"``: the plain step on CPU, inductor with CUDA graphs on CUDA, without
    CUDA graphs where they are not valid (random draws, collectives), plain without triton."""
    assert auto_backend(device, random, distributed, triton) == expected


@pytest.mark.parametrize("quantities, random", [(["diag_ggn_exact"], False),
                                                (["diag_ggn_mc"], True), (["kfac"], True)])
def test_auto_on_cpu_is_the_plain_step_and_sees_random_draws(monkeypatch, quantities, random):
    seen = []
    monkeypatch.setattr(fxcurv_backend, "auto_backend",
                        lambda *args: seen.append(args) or (None, None))
    step = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), quantities)
    assert "forward" not in vars(step) and "backend" not in step.meta["fxcurv"]
    assert [args[:3] for args in seen] == [(CPU, random, False)]


def test_cuda_graph_results_are_copied_out_of_the_pool(monkeypatch):
    """Under ``mode="reduce-overhead"`` the results are fresh tensors (the graph's pool is
    overwritten by the next call); checked with a stand-in for torch.compile on CPU."""
    pool = torch.zeros(3)

    def fake_compile(forward, backend, mode):
        assert (backend, mode) == ("inductor", "reduce-overhead")
        return lambda *args: (pool, {"w": pool})

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(fxcurv_backend, "_check_backend", lambda backend: None)
    plain = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), verify=False)  # no eager first call
    step = fxcurv_backend.with_backend(plain, "inductor", "reduce-overhead")
    loss, grads = step(None)
    pool.fill_(1.0)
    assert torch.equal(loss, torch.zeros(3)) and torch.equal(grads["w"], torch.zeros(3))
    assert step.meta["fxcurv"]["mode"] == "reduce-overhead"
