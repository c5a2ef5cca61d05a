"""A zoo of small float64 models with their losses, for whole-model tests.

Each factory builds a fresh :class:`ModelCase` (fresh parameters, seeded, so two calls give
equal models). Inputs are tiny (batch 3-5, few channels, spatial size <= 8) except the seed
MNIST CNN of ``seeds/000`` (batch 2, ``[2, 1, 28, 28]``).

``ZOO`` maps a case name to its factory; ``SCRIPTED`` names the subset checked under
TorchScript (the seed CNN, conv_transpose, batch_norm eval, embedding, layer_norm and at least
one model per loss).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from setups import ResidualMLP, randomize_bn

DTYPE = torch.float64


@dataclass
class ModelCase:
    """A model, its loss and a batch maker ``make_batch(n) -> (x, y)`` (deterministic in n)."""

    name: str
    model: nn.Module
    loss_fn: Callable
    make_batch: Callable[[int], tuple[Tensor, Tensor]]
    batch_size: int
    # False: the model mixes samples (BatchNorm in train mode), so per-sample quantities are
    # undefined and fxcurv.compile must raise CompileError when one is requested.
    per_sample: bool = True
    tags: frozenset = field(default_factory=frozenset)

    def batch(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        return self.make_batch(self.batch_size if n is None else n)

    def to(self, dtype: torch.dtype) -> "ModelCase":
        """The same case with the model and the floating inputs/targets in ``dtype``."""
        model = copy.deepcopy(self.model).to(dtype)
        make = self.make_batch

        def make_batch(n: int) -> tuple[Tensor, Tensor]:
            x, y = make(n)
            return _cast(x, dtype), _cast(y, dtype)

        return replace(self, model=model, make_batch=make_batch)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


# ---------------------------------------------------------------------------------- batches
def _gen(n: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * salt + n)


def _randn(n: int, *shape: int, salt: int = 0) -> Tensor:
    return torch.randn(n, *shape, generator=_gen(n, salt), dtype=DTYPE)


def _classes(n: int, num_classes: int, *shape: int, salt: int = 1) -> Tensor:
    return torch.randint(0, num_classes, (n, *shape), generator=_gen(n, salt))


def _probs(n: int, *shape: int, salt: int = 2) -> Tensor:
    return torch.rand(n, *shape, generator=_gen(n, salt), dtype=DTYPE)


def classification(in_shape: tuple, num_classes: int, *target_shape: int):
    """``n -> (x [n, *in_shape], class indices [n, *target_shape])``."""
    return lambda n: (_randn(n, *in_shape), _classes(n, num_classes, *target_shape))


def regression(in_shape: tuple, out_shape: tuple):
    """``n -> (x [n, *in_shape], y [n, *out_shape])`` both standard normal."""
    return lambda n: (_randn(n, *in_shape), _randn(n, *out_shape, salt=3))


def _case(name: str, seed: int, build: Callable[[], nn.Module], loss_fn: Callable,
          make_batch: Callable, batch_size: int = 4, *, train: bool = False,
          per_sample: bool = True, tags: tuple = ()) -> ModelCase:
    torch.manual_seed(seed)
    model = build().to(DTYPE)
    model.train(train)
    return ModelCase(name, model, loss_fn, make_batch, batch_size, per_sample, frozenset(tags))


# ----------------------------------------------------------------------------------- models
class FunctionalMLP(nn.Module):
    """The Sequential MLP ``Linear(5, 7), ReLU, Linear(7, 3)`` written with F.* and raw
    parameters (same parameter shapes; names ``w1, b1, w2, b2``)."""

    def __init__(self, d_in: int = 5, hidden: int = 7, d_out: int = 3):
        super().__init__()
        ref = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
        self.w1 = nn.Parameter(ref[0].weight.detach().clone())
        self.b1 = nn.Parameter(ref[0].bias.detach().clone())
        self.w2 = nn.Parameter(ref[2].weight.detach().clone())
        self.b2 = nn.Parameter(ref[2].bias.detach().clone())

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


def seed_cnn() -> nn.Module:
    """seeds/000: BackPACK's DiagGGN MNIST example CNN (nn.Flatten for BackPACK's Flatten)."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(20, 50, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Flatten(), nn.Linear(4 * 4 * 50, 500), nn.ReLU(), nn.Linear(500, 10))


class SharedLinear(nn.Module):
    """One ``nn.Linear`` applied twice (its per-sample terms add up over both uses)."""

    def __init__(self, d: int = 4, d_out: int = 2):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        return self.head(self.shared(torch.tanh(self.shared(x))))


class ViewFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(x.view(x.size(0), -1))


class CatBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Linear(5, 3)
        self.right = nn.Linear(5, 2)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        h = torch.cat([torch.relu(self.left(x)), torch.sigmoid(self.right(x))], dim=1)
        return self.head(h)


class LayerNormSeq(nn.Module):
    """``[N, T, D]`` -> Linear -> LayerNorm(D) -> mean over T -> Linear."""

    def __init__(self, d: int = 6, d_out: int = 3):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, d_out)
        with torch.no_grad():
            self.norm.weight.copy_(torch.randn(d))
            self.norm.bias.copy_(torch.randn(d))

    def forward(self, x):
        return self.head(self.norm(self.proj(x)).mean(1))


class EmbeddingMean(nn.Module):
    """Integer tokens ``[N, T]`` -> Embedding -> mean over T -> Linear."""

    def __init__(self, vocab: int = 11, d: int = 4, d_out: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


class FunctionalActivations(nn.Module):
    """logsigmoid, gelu (both approximations), silu, softplus, then log_softmax (for NLL)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 6)
        self.l3 = nn.Linear(6, 3)

    def forward(self, x):
        h = F.logsigmoid(self.l1(x))
        h = F.gelu(h) + F.gelu(h, approximate="tanh")
        h = F.silu(self.l2(h))
        h = F.softplus(h, beta=2.0)
        return F.log_softmax(self.l3(h), dim=1)


class FrozenFirst(nn.Module):
    """A frozen first layer (requires_grad=False): not a key of grad or the quantities."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 5)
        self.trained = nn.Linear(5, 3)
        self.frozen.weight.requires_grad_(False)
        self.frozen.bias.requires_grad_(False)

    def forward(self, x):
        return self.trained(torch.tanh(self.frozen(x)))


class ScaleShift(nn.Module):
    """Raw parameters in elementwise ops: ``linear(x) * scale + shift`` (broadcast over N)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.randn(3))
        self.shift = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale + self.shift


class TiedEmbedding(nn.Module):
    """Weight tying: the embedding matrix is also the output layer (two different ops use
    one parameter). Tokens ``[N, T]`` -> logits ``[N, vocab, T]``."""

    def __init__(self, vocab: int = 7, d: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x)))
        return F.linear(h, self.emb.weight).transpose(1, 2)


def half_sum_of_squares(out: Tensor, y: Tensor) -> Tensor:
    """A plain callable loss."""
    return ((out - y) ** 2).sum() / 2


# ------------------------------------------------------------------------------- factories
def mlp_sequential():
    return _case("mlp_sequential", 1,
                 lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)),
                 nn.CrossEntropyLoss(), classification((5,), 3), tags=("script",))


def mlp_functional():
    return _case("mlp_functional", 1, FunctionalMLP, nn.CrossEntropyLoss(),
                 classification((5,), 3))


def seed_cnn_mnist():
    return _case("seed_cnn", 0, seed_cnn, nn.CrossEntropyLoss(),
                 classification((1, 28, 28), 10), batch_size=2, tags=("script",))


def residual_mlp():
    return _case("residual_mlp", 2, ResidualMLP, nn.MSELoss(), regression((4,), (3,)),
                 tags=("script",))


def shared_linear():
    return _case("shared_linear", 3, SharedLinear, nn.MSELoss(reduction="sum"),
                 regression((4,), (2,)), tags=("script",))


def view_flatten():
    return _case("view_flatten", 4, ViewFlatten, nn.CrossEntropyLoss(reduction="sum"),
                 classification((2, 3, 3), 4), tags=("script",))


def conv1d_avgpool():
    return _case("conv1d_avgpool", 5,
                 lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(),
                                       nn.AvgPool1d(2), nn.Flatten(), nn.Linear(3 * 4, 3)),
                 nn.CrossEntropyLoss(), classification((2, 8), 3))


def conv3d_maxpool():
    return _case("conv3d_maxpool", 6,
                 lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.Tanh(), nn.MaxPool3d(2),
                                       nn.Flatten(), nn.Linear(3 * 2 * 2 * 2, 2)),
                 nn.MSELoss(), regression((2, 5, 5, 5), (2,)), batch_size=3)


def conv2d_strided():
    """stride / padding / dilation / groups, and a conv without bias."""
    return _case("conv2d_strided", 7,
                 lambda: nn.Sequential(
                     nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                     nn.Conv2d(6, 3, 2, stride=1, padding=2, dilation=2, bias=False),
                     nn.Sigmoid(), nn.Flatten(), nn.Linear(3 * 6 * 5, 3)),
                 nn.CrossEntropyLoss(reduction="sum"), classification((4, 7, 6), 3))


def conv_transpose2d():
    return _case("conv_transpose2d", 8,
                 lambda: nn.Sequential(
                     nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1,
                                        groups=2), nn.ReLU(),
                     nn.ConvTranspose2d(4, 1, 2, dilation=2, bias=False),
                     nn.Flatten(), nn.Linear(10 * 10, 2)),
                 nn.MSELoss(reduction="sum"), regression((2, 4, 4), (2,)), tags=("script",))


def adaptive_avgpool():
    return _case("adaptive_avgpool", 9,
                 lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten(),
                                       nn.Linear(4 * 2 * 3, 3)),
                 nn.CrossEntropyLoss(), classification((2, 7, 8), 3))


def _bn2d_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 3))
    randomize_bn(model[1], num_batches_tracked=7)
    return model


def batchnorm2d_eval():
    return _case("batchnorm2d_eval", 10, _bn2d_model, nn.CrossEntropyLoss(),
                 classification((2, 5, 5), 3), tags=("script",))


def batchnorm2d_train():
    """Mixes samples: per-sample quantities must raise; grad must equal autograd."""
    return _case("batchnorm2d_train", 10, _bn2d_model, nn.CrossEntropyLoss(),
                 classification((2, 5, 5), 3), train=True, per_sample=False)


def batchnorm1d_eval():
    def build():
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
        randomize_bn(model[1], num_batches_tracked=7)
        return model
    return _case("batchnorm1d_eval", 11, build, nn.MSELoss(), regression((4,), (2,)))


def layernorm_seq():
    return _case("layernorm_seq", 12, LayerNormSeq, nn.MSELoss(), regression((3, 6), (3,)),
                 tags=("script",))


def embedding_mean():
    return _case("embedding_mean", 13, EmbeddingMean, nn.CrossEntropyLoss(),
                 lambda n: (_classes(n, 11, 5, salt=4), _classes(n, 3)), tags=("script",))


def activations_bce():
    """sigmoid / tanh / leaky_relu / elu / selu; BCEWithLogits on multi-output targets."""
    return _case("activations_bce", 14,
                 lambda: nn.Sequential(
                     nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 6), nn.Tanh(),
                     nn.Linear(6, 6), nn.LeakyReLU(0.1), nn.Linear(6, 6), nn.ELU(alpha=0.7),
                     nn.Linear(6, 6), nn.SELU(), nn.Linear(6, 3)),
                 nn.BCEWithLogitsLoss(), lambda n: (_randn(n, 4), _probs(n, 3)),
                 tags=("script",))


def activations_nll():
    return _case("activations_nll", 15, FunctionalActivations, nn.NLLLoss(),
                 classification((4,), 3), tags=("script",))


def dropout_eval():
    return _case("dropout_eval", 16,
                 lambda: nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.ReLU(),
                                       nn.Linear(6, 2)),
                 half_sum_of_squares, regression((4,), (2,)), tags=("script",))


def cat_branches():
    return _case("cat_branches", 17, CatBranches, nn.CrossEntropyLoss(reduction="sum"),
                 classification((5,), 4))


def ce_spatial():
    """CrossEntropy on ``(N, C, d)`` outputs with ``(N, d)`` targets (mean over N*d)."""
    return _case("ce_spatial", 18,
                 lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(),
                                       nn.Conv1d(4, 3, 1)),
                 nn.CrossEntropyLoss(), classification((2, 6), 3, 6), tags=("script",))


def ce_spatial_sum():
    """The same with reduction sum, the output built with F.linear on ``[N, d, F]``."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(torch.tanh(x)).transpose(1, 2)
    return _case("ce_spatial_sum", 19, Net, nn.CrossEntropyLoss(reduction="sum"),
                 classification((5, 3), 4, 5))


def scale_shift():
    return _case("scale_shift", 21, ScaleShift, nn.MSELoss(), regression((4,), (3,)))


def tied_embedding():
    return _case("tied_embedding", 22, TiedEmbedding, nn.CrossEntropyLoss(),
                 lambda n: (_classes(n, 7, 5, salt=4), _classes(n, 7, 5)))


def frozen_first():
    return _case("frozen_first", 20, FrozenFirst, nn.MSELoss(reduction="sum"),
                 regression((4,), (3,)))


_FACTORIES = (
    mlp_sequential, mlp_functional, seed_cnn_mnist, residual_mlp, shared_linear, view_flatten,
    conv1d_avgpool, conv3d_maxpool, conv2d_strided, conv_transpose2d, adaptive_avgpool,
    batchnorm2d_eval, batchnorm2d_train, batchnorm1d_eval, layernorm_seq, embedding_mean,
    activations_bce, activations_nll, dropout_eval, cat_branches, ce_spatial, ce_spatial_sum,
    frozen_first, scale_shift, tied_embedding)
_CASES = [f() for f in _FACTORIES]
ZOO: dict[str, Callable[[], ModelCase]] = {c.name: f for c, f in zip(_CASES, _FACTORIES)}
SCRIPTED = [c.name for c in _CASES if "script" in c.tags]
del _CASES
