"""GGN-family quantities equal BackPACK 1.7.1's, in float64, on every layer and loss BackPACK
supports for them: ``diag_ggn_exact``, ``diag_ggn_exact_batch``, ``sqrt_ggn_exact`` and
``kflr``; plus Kronecker factors BackPACK does not define (grouped convolutions, embedding)
against brute-force definitions.

BackPACK runs on an extended deep copy of each model (``extend`` mutates modules), with the
default dtype float64 (its embedding rule builds a one-hot matrix in the default dtype).

Notes on BackPACK 1.7.1 (``backpack/extensions/secondorder/``):
* KFLR (the ``hbp`` extensions) supports only Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d
  with ``groups == 1`` (it raises ``NotImplementedError`` otherwise), MaxPool2d, AvgPool2d,
  ZeroPad2d, Dropout, Flatten, ReLU, Sigmoid, Tanh and the three losses. Models with other
  layers (other activations and pools, BatchNorm, Embedding, grouped convs) are compared on the
  three other quantities only.
* KFLR for ConvTranspose (``hbp/conv_transposend.py``) returns the factors of the Hessian
  with respect to ``weight.transpose(0, 1)`` (``[Cout, Cin, *k]``): ``G = [Cout, Cout]`` from
  the factor summed over output positions, ``A = [Cin·K, Cin·K]`` from the transposed unfold
  of the input (``unfoldNd.unfold_transposeNd``); it warns about that on every call.
* Conv weight factors: ``G`` is the bias GGN (the KFC paper's Γ times the number of output
  positions), ``A = Σ_n U_n U_nᵀ / N`` for every reduction (``hbp/convnd.py``).
* CrossEntropyLoss on ``[N, C, d]`` input: BackPACK's exact factor has ``C·d`` columns (the
  per-position factors embedded block-diagonally, ``_expand_sqrt_h``), so ``sqrt_ggn_exact`` is
  ``[C·d, N, *p.shape]``; fxcurv's is the same (column ``c·d + j`` at position ``j``).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcurv
from fxcurv.errors import CompileError
from setups import default_dtype, make_batch, randomize_bn, with_head

backpack = pytest.importorskip("backpack")
from backpack.extensions import (  # noqa: E402
    KFLR,
    BatchDiagGGNExact,
    DiagGGNExact,
    SqrtGGNExact,
)

DTYPE = torch.float64
N = 3
NUM_OUT = 3
TOL = dict(rtol=1e-8, atol=1e-12)
FLOAT32_TOL = dict(rtol=1e-4, atol=1e-6)  # the CUDA twins run in float32
# fxcurv's names are BackPACK's savefields
QUANTITIES = ["diag_ggn_exact", "diag_ggn_exact_batch", "sqrt_ggn_exact", "kflr"]
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:The Kronecker factors stored:UserWarning")


def _mlp(*middle) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), *middle, nn.Linear(3, NUM_OUT))


# BackPACK's support: all four, all but KFLR, or only the diagonals (SqrtGGN has no
# AdaptiveAvgPool extension)
ALL, NO_KFLR, DIAGONALS = tuple(QUANTITIES), tuple(QUANTITIES[:3]), tuple(QUANTITIES[:2])
# name -> (model builder, input shape, integer input range or None, quantities BackPACK supports)
LAYERS = {
    "linear_relu": (lambda: _mlp(nn.ReLU()), (4,), None, ALL),
    "linear_nobias_sigmoid_tanh": (
        lambda: nn.Sequential(nn.Linear(4, 3, bias=False), nn.Sigmoid(), nn.Linear(3, 3),
                              nn.Tanh(), nn.Linear(3, NUM_OUT)), (4,), None, ALL),
    "dropout_eval": (lambda: _mlp(nn.Dropout(0.5), nn.ReLU()), (4,), None, ALL),
    "leaky_relu_elu": (lambda: nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(0.2),
                                             nn.Linear(3, 3), nn.ELU(0.7),
                                             nn.Linear(3, NUM_OUT)), (4,), None, NO_KFLR),
    "selu_logsigmoid": (lambda: nn.Sequential(nn.Linear(4, 3), nn.SELU(), nn.Linear(3, 3),
                                              nn.LogSigmoid(), nn.Linear(3, NUM_OUT)),
                        (4,), None, NO_KFLR),
    "conv1d": (lambda: with_head([nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2),
                                  nn.ReLU()], (2, 6)), (2, 6), None, ALL),
    "conv2d_maxpool": (lambda: with_head([nn.Conv2d(2, 3, (3, 2), stride=(2, 1),
                                                    padding=(1, 0)), nn.Tanh(),
                                          nn.MaxPool2d(2)], (2, 5, 5)), (2, 5, 5), None, ALL),
    "zeropad_conv2d_avgpool": (
        lambda: with_head([nn.ZeroPad2d((1, 0, 1, 2)), nn.Conv2d(2, 3, 2, dilation=2,
                                                                 bias=False),
                           nn.Sigmoid(), nn.AvgPool2d(2, stride=1)], (2, 4, 4)),
        (2, 4, 4), None, ALL),
    "conv3d": (lambda: with_head([nn.Conv3d(2, 2, (2, 2, 1), stride=(1, 2, 1),
                                            padding=(1, 0, 1), dilation=(1, 1, 2)),
                                  nn.ReLU()], (2, 3, 4, 3)), (2, 3, 4, 3), None, ALL),
    "conv1d_groups_pool1d": (
        lambda: with_head([nn.Conv1d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
                           nn.MaxPool1d(2), nn.AvgPool1d(2, stride=1)], (4, 6)),
        (4, 6), None, NO_KFLR),
    "conv2d_groups": (lambda: with_head([nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2,
                                                   groups=2), nn.Tanh()], (2, 5, 4)),
                      (2, 5, 4), None, NO_KFLR),
    "conv3d_groups_pool3d": (
        lambda: with_head([nn.Conv3d(2, 4, 2, padding=1, groups=2), nn.Sigmoid(),
                           nn.MaxPool3d(2), nn.AvgPool3d(1, stride=1)], (2, 3, 3, 3)),
        (2, 3, 3, 3), None, NO_KFLR),
    "conv_transpose1d": (lambda: with_head([nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1,
                                                               dilation=2), nn.ReLU()],
                                           (2, 3)), (2, 3), None, ALL),
    "conv_transpose2d": (lambda: with_head([nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 1),
                                                               padding=(1, 0)), nn.Tanh()],
                                           (2, 3, 2)), (2, 3, 2), None, ALL),
    "conv_transpose3d": (lambda: with_head([nn.ConvTranspose3d(2, 2, 2, stride=2,
                                                               bias=False), nn.ReLU()],
                                           (2, 2, 1, 2)), (2, 2, 1, 2), None, ALL),
    "conv_transpose2d_groups": (
        lambda: with_head([nn.ConvTranspose2d(4, 2, 2, stride=2, padding=1, dilation=2,
                                              groups=2), nn.Sigmoid()], (4, 3, 2)),
        (4, 3, 2), None, NO_KFLR),
    "adaptive_avg_pool": (
        lambda: with_head([nn.Conv2d(2, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 1))],
                          (2, 4, 3)), (2, 4, 3), None, DIAGONALS),
    "adaptive_avg_pool_1d_3d": (
        lambda: with_head([nn.Conv3d(1, 2, 1), nn.AdaptiveAvgPool3d((1, 2, 1)), nn.Flatten(2),
                           nn.AdaptiveAvgPool1d(1)], (1, 2, 4, 2)), (1, 2, 4, 2), None, DIAGONALS),
    "batchnorm1d_eval": (lambda: randomize_bn(_mlp(nn.BatchNorm1d(3), nn.ReLU())),
                         (4,), None, NO_KFLR),
    "batchnorm2d_eval": (lambda: randomize_bn(with_head([nn.Conv2d(2, 2, 2), nn.BatchNorm2d(2),
                                                         nn.ReLU()], (2, 3, 3))),
                         (2, 3, 3), None, NO_KFLR),
    "embedding": (lambda: nn.Sequential(nn.Embedding(5, 3), nn.Flatten(),
                                        nn.Linear(2 * 3, NUM_OUT)), (2,), 5, NO_KFLR),
}
LOSSES = {
    "ce_mean": lambda: nn.CrossEntropyLoss(reduction="mean"),
    "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "mse_mean": lambda: nn.MSELoss(reduction="mean"),
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
}


def make_model(layer: str, num_out: int = NUM_OUT) -> nn.Module:
    torch.manual_seed(sorted(LAYERS).index(layer))
    build = LAYERS[layer][0]
    with default_dtype(DTYPE):
        model = build()
        if num_out != NUM_OUT:  # replace the head
            last = model[-1]
            model[-1] = nn.Linear(last.in_features, num_out)
    return model.eval()


EXTENSIONS = {"diag_ggn_exact": DiagGGNExact, "diag_ggn_exact_batch": BatchDiagGGNExact,
              "sqrt_ggn_exact": SqrtGGNExact, "kflr": KFLR}


def run_backpack(model: nn.Module, loss_fn: nn.Module, x, y, quantities=ALL,
                 dtype=DTYPE) -> list[dict]:
    """BackPACK's ``quantities`` (its savefields) from one backward pass on an extended copy."""
    model = backpack.extend(copy.deepcopy(model))
    loss_fn = backpack.extend(copy.deepcopy(loss_fn))
    with default_dtype(dtype), backpack.backpack(*[EXTENSIONS[q]() for q in quantities]):
        loss_fn(model(x), y).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{n: getattr(p, field) for n, p in params} for field in quantities]


def assert_equal_backpack(what: str, actual: dict, expected: dict, tol=TOL) -> None:
    assert list(actual) == list(expected), f"{what}: keys differ"
    for key, ref in expected.items():
        got = actual[key]
        if isinstance(ref, list):  # Kronecker factors
            assert len(got) == len(ref), f"{what}[{key}]: {len(got)} factors vs {len(ref)}"
            for i, (a, b) in enumerate(zip(got, ref)):
                assert a.shape == b.shape, f"{what}[{key}][{i}]: {a.shape} vs {b.shape}"
                torch.testing.assert_close(a, b, **tol, msg=f"{what}[{key}][{i}] vs BackPACK")
            continue
        assert got.shape == ref.shape, f"{what}[{key}]: {tuple(got.shape)} vs {tuple(ref.shape)}"
        assert got.device == ref.device, f"{what}[{key}]: device {got.device} vs {ref.device}"
        torch.testing.assert_close(got, ref, **tol, msg=f"{what}[{key}] vs BackPACK")


def compare(model: nn.Module, loss_fn: nn.Module, x, y, quantities=ALL, dtype=DTYPE,
            tol=TOL) -> None:
    step = fxcurv.compile(model, loss_fn, list(quantities))
    _, _, *ours = step(x, y)
    for what, actual, expected in zip(quantities, ours,
                                      run_backpack(model, loss_fn, x, y, quantities, dtype)):
        assert_equal_backpack(what, actual, expected, tol)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_ggn_equal_backpack(layer, loss):
    _, in_shape, vocab, supported = LAYERS[layer]
    x, y = make_batch(in_shape, vocab, loss, N)
    compare(make_model(layer), LOSSES[loss](), x, y, supported)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_ggn_equal_backpack_on_cuda(layer, loss, cuda_device):
    """The same on CUDA, in float32 (float32 tolerances), fxcurv and BackPACK both there."""
    _, in_shape, vocab, supported = LAYERS[layer]
    x, y = make_batch(in_shape, vocab, loss, N, dtype=torch.float32)
    model = make_model(layer).float().to(cuda_device)
    compare(model, LOSSES[loss](), x.to(cuda_device), y.to(cuda_device), supported,
            torch.float32, FLOAT32_TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("layer", ["linear_relu", "conv2d_maxpool", "conv_transpose1d"])
def test_bce_with_logits_equal_backpack(layer, reduction):
    """BCEWithLogitsLoss on a ``[N, 1]`` output (the only shape BackPACK supports)."""
    _, in_shape, vocab, supported = LAYERS[layer]
    x, y = make_batch(in_shape, vocab, "bce", N, num_out=1)
    compare(make_model(layer, num_out=1), nn.BCEWithLogitsLoss(reduction=reduction), x, y,
            supported)


# -- cross-entropy with extra axes ([N, C, d]) ------------------------------------------------
def _ce_positions_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, NUM_OUT, 2), nn.Sigmoid()).to(DTYPE)


def _ce_positions_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, 4, generator=gen, dtype=DTYPE)
    return x, torch.randint(0, NUM_OUT, (N, 3), generator=gen)


def _ggn_diagonals(model: nn.Module, loss_fn: nn.Module, x, y) -> dict:
    """``diag(Jᵀ H J)`` per parameter by brute force (``torch.func``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = torch.func.functional_call(model, params, (x,))
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    hess = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    diagonals = {}
    for name, p in params.items():
        j = jac[name].reshape(out.numel(), -1)
        diagonals[name] = torch.einsum("oi,op,pi->i", j, hess, j).reshape(p.shape)
    return diagonals


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_positions_equal_backpack(reduction):
    model, loss_fn = _ce_positions_model(), nn.CrossEntropyLoss(reduction=reduction)
    x, y = _ce_positions_batch()
    compare(model, loss_fn, x, y)


def test_cross_entropy_positions_diag_ggn_vs_torch_func():
    model, loss_fn = _ce_positions_model(), nn.CrossEntropyLoss()
    x, y = _ce_positions_batch()
    _, _, diag = fxcurv.compile(model, loss_fn, ["diag_ggn_exact"])(x, y)
    for name, expected in _ggn_diagonals(model, loss_fn, x, y).items():
        torch.testing.assert_close(diag[name], expected, **TOL, msg=name)


def test_backpack_cross_entropy_positions_is_exact():
    """The reference itself: BackPACK's diag_ggn_exact for [N, C, d] is the true diagonal."""
    model, loss_fn = _ce_positions_model(), nn.CrossEntropyLoss()
    x, y = _ce_positions_batch()
    expected = _ggn_diagonals(model, loss_fn, x, y)
    for name, value in run_backpack(model, loss_fn, x, y, DIAGONALS[:1])[0].items():
        torch.testing.assert_close(value, expected[name], **TOL, msg=name)


# -- Kronecker factors BackPACK does not define ---------------------------------------------
def _unfold(x, weight_shape, stride, padding, dilation):
    """Brute-force im2col ``[N, Cin·K, P]`` (``F.unfold`` on 2-d input, channel-major)."""
    return F.unfold(x, weight_shape[2:], dilation=dilation, padding=padding, stride=stride)


def _sqrt_ggn_at(model: nn.Module, loss_fn: nn.Module, x, y, index: int) -> torch.Tensor:
    """The exact sqrt-GGN factor at the output of ``model[index]`` ``[C, N, *out]``: the output
    Jacobian of the rest of the model applied to the loss Hessian's factor."""
    head = model[:index + 1](x).detach()
    tail = model[index + 1:]
    out = tail(head)
    classes = out.size(1)
    p = out.softmax(1)
    scale = 1 / out.size(0) if getattr(loss_fn, "reduction", "sum") == "mean" else 1.0
    factor = (torch.diag_embed(p.sqrt()) - torch.einsum("nc,nd->ncd", p, p.sqrt()))  # [N, C, C]
    factor = factor.permute(2, 0, 1) * scale ** 0.5  # [C(col), N, C]
    _, vjp = torch.func.vjp(tail, head)
    return torch.stack([vjp(factor[c])[0] for c in range(classes)])


@pytest.mark.parametrize("kind", ["conv", "conv_transpose"])
def test_grouped_conv_factors_brute_force(kind):
    """groups > 1: ``G[j]`` from the output-channel block j of the factor (summed over output
    positions), ``A[j]`` from the input-channel block j of the unfolded input."""
    torch.manual_seed(3)
    groups, cin, cout = 2, 4, 6
    if kind == "conv":
        conv = nn.Conv2d(cin, cout, (2, 3), stride=(2, 1), padding=1, dilation=(1, 2),
                         groups=groups)
    else:
        conv = nn.ConvTranspose2d(cin, cout, (2, 3), stride=(2, 1), padding=1,
                                  output_padding=(1, 0), dilation=(1, 2), groups=groups)
    in_shape = (cin, 4, 5)
    model = with_head([conv, nn.Tanh()], in_shape).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_batch(in_shape, None, "ce", N)
    _, _, kflr, kfac = fxcurv.compile(model, loss_fn, ["kflr", "kfac"])(x, y)

    s = _sqrt_ggn_at(model, loss_fn, x, y, 0)                # [C, N, Cout, *out]
    b = s.flatten(3).sum(-1).reshape(-1, groups, cout // groups)
    if kind == "conv":
        u = _unfold(x, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
    else:  # transposed unfold: the one-hot kernel of conv_transpose, built here by autograd
        u = _transpose_unfold_by_jacobian(conv, x)
    u = u.reshape(N, groups, -1, u.size(-1))
    big_g = torch.einsum("mgi,mgj->gij", b, b)
    big_a = torch.einsum("ngap,ngbp->gab", u, u) / N
    for factors in (kflr, kfac):
        assert [tuple(f.shape) for f in factors["0.weight"]] == \
            [(groups, cout // groups, cout // groups), (groups, cin // groups * 6,
                                                        cin // groups * 6)]
        assert [tuple(f.shape) for f in factors["0.bias"]] == [(cout, cout)]
    torch.testing.assert_close(kflr["0.weight"][0], big_g, **TOL)
    torch.testing.assert_close(kflr["0.weight"][1], big_a, **TOL)
    torch.testing.assert_close(kfac["0.weight"][1], big_a, **TOL)  # A does not depend on MC
    bias_b = s.flatten(3).sum(-1).flatten(0, 1)
    torch.testing.assert_close(kflr["0.bias"][0], bias_b.T @ bias_b, **TOL)
    # the diagonal blocks of G: those of the bias factor
    for j in range(groups):
        block = slice(j * cout // groups, (j + 1) * cout // groups)
        torch.testing.assert_close(kflr["0.weight"][0][j], kflr["0.bias"][0][block, block], **TOL)


def _transpose_unfold_by_jacobian(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``U[n, (c, k), p] = ∂y[n, o, p] / ∂W[c, o, k]`` (any o of c's group), ``[N, Cin·K, P]``,
    from the Jacobian of a bias-free transposed convolution with respect to its weight."""
    weight = conv.weight.detach()
    per_group = weight.size(1)

    def y_of(w):
        return F.conv_transpose2d(x, w, None, conv.stride, conv.padding, conv.output_padding,
                                  conv.groups, conv.dilation)
    jac = torch.func.jacrev(y_of)(weight)        # [N, Cout, *out, Cin, Cout/G, *k]
    cin = weight.size(0)
    rows = []
    for c in range(cin):
        o = (c // (cin // conv.groups)) * per_group  # first output channel of c's group
        rows.append(jac[:, o, :, :, c, 0].flatten(1, 2))  # [N, P, kh, kw]
    u = torch.stack(rows, 1)                     # [N, Cin, P, *k]
    return u.flatten(3).transpose(2, 3).flatten(1, 2)


def test_embedding_factors_explicit():
    """Embedding ``[A, G]``: ``A`` the diagonal of index counts / (N·T), ``G = Σ s sᵀ`` over
    the factor at the embedding's output; a padding index is left out of both."""
    torch.manual_seed(4)
    vocab, dim, positions = 6, 3, 4
    for padding_idx in (None, 2):
        model = nn.Sequential(nn.Embedding(vocab, dim, padding_idx=padding_idx), nn.Tanh(),
                              nn.Flatten(), nn.Linear(positions * dim, NUM_OUT)).to(DTYPE)
        loss_fn = nn.CrossEntropyLoss()
        x, y = make_batch((positions,), 5, "ce", N)  # index 5 unused: a zero count
        x[0, :2] = 2
        _, _, kflr, kfac = fxcurv.compile(model, loss_fn, ["kflr", "kfac"])(x, y)
        keep = torch.ones_like(x, dtype=DTYPE) if padding_idx is None else \
            (x != padding_idx).to(DTYPE)
        counts = torch.zeros(vocab, dtype=DTYPE).index_add(0, x.flatten(), keep.flatten())
        s = _sqrt_ggn_at(model, loss_fn, x, y, 0) * keep.unsqueeze(-1)  # [C, N, T, D]
        flat = s.reshape(-1, dim)
        expected = [torch.diag(counts / x.numel()), flat.T @ flat]
        for factors in (kflr, kfac):
            assert [tuple(f.shape) for f in factors["0.weight"]] == [(vocab, vocab), (dim, dim)]
        for got, want in zip(kflr["0.weight"], expected):
            torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(kfac["0.weight"][0], expected[0], **TOL)
        if padding_idx is not None:  # no curvature on the row that never gets a gradient
            assert kflr["0.weight"][0][padding_idx, padding_idx] == 0


@pytest.mark.parametrize("layer", [name for name, spec in LAYERS.items() if "kflr" in spec[3]] +
                         ["conv2d_groups", "conv_transpose2d_groups", "embedding"])
def test_kfac_shapes_equal_kflr(layer):
    """``kfac`` (mc_samples=1) has kflr's factor shapes; input-side factors are identical."""
    _, in_shape, vocab, _ = LAYERS[layer]
    x, y = make_batch(in_shape, vocab, "ce", N)
    model = make_model(layer)
    _, _, kflr, kfac = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kflr", "kfac"],
                                      mc_samples=1)(x, y)
    assert list(kflr) == list(kfac) == [n for n, _ in model.named_parameters()]
    for name in kflr:
        assert [f.shape for f in kfac[name]] == [f.shape for f in kflr[name]], name
        if len(kflr[name]) == 2:  # the input-side factor: [G, A], embedding [A, G]
            side = 0 if layer == "embedding" and name == "0.weight" else 1
            torch.testing.assert_close(kfac[name][side], kflr[name][side], **TOL)


def test_batch_norm_kflr_extends_backpack():
    """BackPACK has no KFLR for BatchNorm; fxcurv gives its scale and shift their GGN block
    ``[G]``, whose diagonal is BackPACK's DiagGGNExact (the other layers: BackPACK's factors)."""
    model = make_model("batchnorm1d_eval")
    x, y = make_batch(LAYERS["batchnorm1d_eval"][1], None, "ce", N)
    with pytest.raises(NotImplementedError):
        run_backpack(model, nn.CrossEntropyLoss(), x, y, ["kflr"])
    kflr, = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kflr"])(x, y)[2:]
    diag, = run_backpack(model, nn.CrossEntropyLoss(), x, y, ["diag_ggn_exact"])
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms
    for name in [f"{n}.{p}" for n in norms for p in ("weight", "bias")]:
        assert len(kflr[name]) == 1 and kflr[name][0].shape == (diag[name].numel(),) * 2
        torch.testing.assert_close(kflr[name][0].diagonal(), diag[name], **TOL)
