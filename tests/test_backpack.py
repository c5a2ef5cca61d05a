"""First-order quantities equal BackPACK 1.7.1's, in float64, on every layer BackPACK supports
for first order, with CrossEntropyLoss and MSELoss, reductions mean and sum.

BackPACK runs on an extended deep copy of each model (``extend`` mutates modules) and stores
``p.grad_batch``, ``p.batch_l2``, ``p.sum_grad_squared``, ``p.variance``.

Notes on BackPACK 1.7.1:
* BatchNorm1d/2d: supported for first order in eval mode (in train mode it raises
  NotImplementedError "Encountered BatchNorm module in training mode").
* Embedding: supported, but its weight rule builds its one-hot tensor with ``zeros`` in the
  default dtype, so in float64 it fails ("expected scalar type Float but found Double") unless
  the default dtype is float64. BackPACK is therefore run with the default dtype float64.
* Conv/ConvTranspose with ``groups > 1``: BackPACK's ``batch_l2`` for the weight is wrong: its
  shortcut (``batch_l2_grad/convnd.py``, ``convtransposend.py``) ignores the groups and
  disagrees with ``‖grad_batch‖²`` of BackPACK itself. For those layers ``batch_l2`` is compared
  with BackPACK's own ``grad_batch`` squared norms; everything else with BackPACK.
* ConvTranspose with ``output_padding`` (any groups): BackPACK's weight Jacobian ignores it
  and crashes (``shape '[4, 2, 1, 3, 8]' is invalid for input of size 168``), so the configs
  here use none; the zoo's ``conv_transpose2d`` model (output_padding=1) is checked against
  torch.func in ``test_models.py``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxcurv
from models import seed_cnn
from setups import default_dtype, make_batch, randomize_bn, with_head

backpack = pytest.importorskip("backpack")
from backpack.extensions import (  # noqa: E402
    BatchGrad,
    BatchL2Grad,
    SumGradSquared,
    Variance,
)

DTYPE = torch.float64
N = 4
QUANTITIES = ["batch_grad", "batch_l2", "sum_grad_squared", "variance"]
SAVEFIELDS = ["grad_batch", "batch_l2", "sum_grad_squared", "variance"]
TOL = dict(rtol=1e-8, atol=1e-12)
FLOAT32_TOL = dict(rtol=1e-4, atol=1e-6)  # the CUDA twins run in float32
NUM_OUT = 3
# BackPACK's module hooks fire on outputs when the input does not require grad: expected.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


# name -> (model builder, input shape, integer input range or None); all models end in
# [N, NUM_OUT]. Every conv uses non-default stride / padding / dilation / groups somewhere.
# GROUPED: layers whose first module is a conv with groups > 1 (see the module docstring).
LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, NUM_OUT)),
               (5,), None),
    "linear_nobias_sigmoid": (lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Sigmoid(),
                                                    nn.Linear(4, NUM_OUT)), (5,), None),
    "conv1d": (lambda: with_head([nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2),
                                  nn.ReLU(), nn.AvgPool1d(2)], (2, 8)), (2, 8), None),
    "conv2d": (lambda: with_head([nn.Conv2d(2, 4, 3, stride=(2, 1), padding=2, dilation=2,
                                            groups=2), nn.Tanh(), nn.MaxPool2d(2)],
                                 (2, 7, 6)), (2, 7, 6), None),
    "conv2d_nobias": (lambda: with_head([nn.Conv2d(3, 2, (2, 3), padding=(1, 0), bias=False),
                                         nn.ReLU()], (3, 4, 5)), (3, 4, 5), None),
    "conv3d": (lambda: with_head([nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1),
                                            padding=(1, 0, 1), dilation=(2, 1, 1), groups=2),
                                  nn.Sigmoid()], (2, 4, 5, 3)), (2, 4, 5, 3), None),
    "conv_transpose1d": (lambda: with_head([nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1,
                                                               dilation=2, groups=2),
                                            nn.ReLU()], (2, 4)), (2, 4), None),
    "conv_transpose2d": (lambda: with_head([nn.ConvTranspose2d(2, 4, (3, 2), stride=(2, 1),
                                                               padding=(1, 0), dilation=(1, 2),
                                                               groups=2), nn.Tanh()],
                                           (2, 3, 4)), (2, 3, 4), None),
    "conv_transpose3d": (lambda: with_head([nn.ConvTranspose3d(2, 3, 2, stride=2,
                                                               bias=False), nn.ReLU()],
                                           (2, 2, 3, 2)), (2, 2, 3, 2), None),
    "batchnorm1d_eval": (lambda: randomize_bn(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5),
                                                            nn.ReLU(), nn.Linear(5, NUM_OUT))),
                         (4,), None),
    "batchnorm2d_eval": (lambda: randomize_bn(with_head([nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3),
                                                         nn.ReLU()], (2, 5, 5))),
                         (2, 5, 5), None),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(),
                                        nn.Linear(3 * 4, NUM_OUT)), (3,), 10),
}
GROUPED = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d"}
LOSSES = {
    "ce_mean": lambda: nn.CrossEntropyLoss(reduction="mean"),
    "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "mse_mean": lambda: nn.MSELoss(reduction="mean"),
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
}


def make_model(layer: str) -> nn.Module:
    torch.manual_seed(sorted(LAYERS).index(layer))
    build, _, _ = LAYERS[layer]
    return build().to(DTYPE).eval()


def run_backpack(model: nn.Module, loss_fn: nn.Module, x, y, dtype=DTYPE):
    """Loss, grad and the four first-order quantities from BackPACK on an extended copy."""
    model = backpack.extend(copy.deepcopy(model))
    loss_fn = backpack.extend(copy.deepcopy(loss_fn))
    with default_dtype(dtype), backpack.backpack(BatchGrad(), BatchL2Grad(), SumGradSquared(),
                                                 Variance()):
        loss = loss_fn(model(x), y)
        loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: p.grad for n, p in params}
    quantities = [{n: getattr(p, field) for n, p in params} for field in SAVEFIELDS]
    return loss.detach(), grads, quantities


def compare(model: nn.Module, loss_fn: nn.Module, x, y, grouped: bool = False, dtype=DTYPE,
            tol=TOL):
    step = fxcurv.compile(model, loss_fn, QUANTITIES)
    loss, grads, *quantities = step(x, y)
    ref_loss, ref_grads, ref_quantities = run_backpack(model, loss_fn, x, y, dtype)
    if grouped:  # BackPACK's batch_l2 ignores conv groups: use its own grad_batch instead
        ref_quantities[1] = {k: g.flatten(1).square().sum(1)
                             for k, g in ref_quantities[0].items()}
    torch.testing.assert_close(loss, ref_loss, **tol, msg="loss")
    for what, actual, expected in zip(["grad"] + QUANTITIES, [grads, *quantities],
                                      [ref_grads, *ref_quantities]):
        assert list(actual) == list(expected), f"{what}: keys differ"
        for key in expected:
            assert actual[key].shape == expected[key].shape, \
                f"{what}[{key}]: {tuple(actual[key].shape)} vs {tuple(expected[key].shape)}"
            assert actual[key].device == expected[key].device, f"{what}[{key}]: device"
            torch.testing.assert_close(actual[key], expected[key], **tol,
                                       msg=f"{what}[{key}] vs BackPACK")


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_first_order_equal_backpack(layer, loss):
    _, in_shape, vocab = LAYERS[layer]
    x, y = make_batch(in_shape, vocab, loss, N)
    compare(make_model(layer), LOSSES[loss](), x, y, grouped=layer in GROUPED)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_first_order_equal_backpack_on_cuda(layer, loss, cuda_device):
    """The same on CUDA, in float32 (float32 tolerances), fxcurv and BackPACK both there."""
    _, in_shape, vocab = LAYERS[layer]
    x, y = make_batch(in_shape, vocab, loss, N, dtype=torch.float32)
    model = make_model(layer).float().to(cuda_device)
    compare(model, LOSSES[loss](), x.to(cuda_device), y.to(cuda_device),
            grouped=layer in GROUPED, dtype=torch.float32, tol=FLOAT32_TOL)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_seed_cnn_equal_backpack(loss):
    torch.manual_seed(0)
    model = seed_cnn().to(DTYPE)
    x, y = make_batch((1, 28, 28), None, loss, n=2, num_out=10)
    compare(model, LOSSES[loss](), x, y)
