"""Structured inputs, targets and outputs (``fxcurv/inputs.py``): a model fed a dict or a tuple
of tensors, a loss over a tuple of targets, a model returning several tensors (a tuple, a
dict, a named tuple). Every quantity checked is compared in float64 with brute force that
involves no fxcurv code: per-sample gradients of ``loss_fn(model(x_n), y_n)`` (sum
reductions, so a sample's loss is its own term) and the GGN ``Σ_n J_nᵀ H_n J_n`` over the
model's outputs flattened and joined, by ``torch.func``."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev
from torch.utils import _pytree as pytree

import fxcurv

N, D, C = 5, 6, 3


def _sample(tree, n: int):
    """Sample ``n`` of every tensor in ``tree`` (axis 0 kept)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t[n:n + 1], tree)


def _flat(tree) -> torch.Tensor:
    """The floating tensors of ``tree`` flattened and joined (integers have no derivative)."""
    return torch.cat([t.reshape(-1) for t in pytree.tree_leaves(tree) if t.is_floating_point()])


def reference(model: nn.Module, loss_fn, x, y) -> dict:
    """Gradient, per-sample gradients, the GGN and Hessian diagonals by brute force."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    result = {"grad": grad(lambda p: loss_fn(functional_call(model, p, (x,)), y))(params),
              "batch_grad": {k: [] for k in params},
              "diag_ggn_exact": {k: torch.zeros_like(v) for k, v in params.items()}}
    for n in range(N):
        xn, yn = _sample(x, n), _sample(y, n)
        per_sample = grad(lambda p: loss_fn(functional_call(model, p, (xn,)), yn))(params)
        for k in params:
            result["batch_grad"][k].append(per_sample[k])
        out = functional_call(model, params, (xn,))
        leaves, spec = pytree.tree_flatten(out)
        sizes = [leaf.numel() if leaf.is_floating_point() else 0 for leaf in leaves]

        def unflat(flat):
            pieces = iter(torch.split(flat, sizes))
            return pytree.tree_unflatten([next(pieces).reshape(l.shape)
                                          if l.is_floating_point() else (next(pieces), l)[1]
                                          for l in leaves], spec)
        jac = jacrev(lambda p: _flat(functional_call(model, p, (xn,))))(params)
        hess = hessian(lambda flat: loss_fn(unflat(flat), yn))(_flat(out))
        for k in params:
            j = jac[k].reshape(hess.shape[0], -1)
            result["diag_ggn_exact"][k] += torch.einsum("oi,op,pi->i", j, hess, j).reshape(
                params[k].shape)
    result["batch_grad"] = {k: torch.stack(v) for k, v in result["batch_grad"].items()}
    result["diag_h"] = _hessian_diagonal(model, loss_fn, x, y, params)
    return result


def _hessian_diagonal(model: nn.Module, loss_fn, x, y, params: dict) -> dict:
    """The diagonal of the loss's Hessian in the flattened parameters."""
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def loss_of(flat):
        pieces = torch.split(flat, sizes)
        unflat = {k: v.reshape(s) for k, v, s in zip(names, pieces, shapes)}
        return loss_fn(functional_call(model, unflat, (x,)), y)
    diagonal = hessian(loss_of)(_flat(list(params.values()))).diagonal()
    return {k: v.reshape(s) for k, v, s in zip(names, torch.split(diagonal, sizes), shapes)}


def assert_matches(model: nn.Module, loss_fn, x, y,
                   quantities=("batch_grad", "diag_ggn_exact")) -> None:
    """fxcurv's gradient and ``quantities`` equal the brute-force reference."""
    model = model.double()
    expected = reference(model, loss_fn, x, y)
    step = fxcurv.compile(model, loss_fn, list(quantities))
    loss, gradient, *results = step(x, y)
    assert torch.allclose(loss, loss_fn(model(x), y), rtol=1e-10)
    for name, values in [("grad", gradient), *zip(quantities, results)]:
        for k, value in values.items():
            torch.testing.assert_close(value, expected[name][k], rtol=1e-9, atol=1e-12,
                                       msg=f"{name} of {k}")


def _gen():
    return torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(*shape, generator=_gen(), dtype=torch.float64)


def _labels(classes: int, *shape):
    return torch.randint(0, classes, shape, generator=_gen())


class ImageAndMeta(nn.Module):
    """``batch["img"]``, ``batch["meta"]``: a dict from a data loader's collate."""

    def __init__(self):
        super().__init__()
        self.img, self.extra, self.head = nn.Linear(D, D), nn.Linear(2, D), nn.Linear(D, C)

    def forward(self, batch):
        return self.head(torch.tanh(self.img(batch["img"]) + self.extra(batch["meta"])))


class TokensAndMask(nn.Module):
    """``ids, mask = x``: masked mean of embedded tokens (padding excluded)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(10, D), nn.Linear(D, D), nn.Linear(D, C)

    def forward(self, x):
        ids, mask = x
        h = torch.tanh(self.lin(self.emb(ids))) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))


class TwoHeads(nn.Module):
    """A class head and a regression head on one body; ``kind`` picks the output container."""

    Out = namedtuple("Out", ["logits", "box"])

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body, self.cls, self.box = nn.Linear(D, D), nn.Linear(D, C), nn.Linear(D, 2)

    def forward(self, x):
        h = torch.sigmoid(self.body(x))
        logits, box = self.cls(h), self.box(h)
        if self.kind == "tuple":
            return logits, box
        if self.kind == "dict":
            return {"logits": logits, "box": box}
        return TwoHeads.Out(logits, box)


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out[0]


def _box(out):
    return out["box"] if isinstance(out, dict) else out.box if hasattr(out, "box") else out[1]


def multitask(out, y):
    """Cross-entropy on the logits plus half the squared error of the box."""
    labels, boxes = y
    return F.cross_entropy(_logits(out), labels, reduction="sum") + \
        0.5 * F.mse_loss(_box(out), boxes, reduction="sum")


def test_dict_input():
    x = {"img": _randn(N, D), "meta": _randn(N, 2)}
    assert_matches(ImageAndMeta(), nn.CrossEntropyLoss(reduction="sum"), x, _labels(C, N),
                   ("batch_grad", "diag_ggn_exact", "diag_h"))


def test_tuple_input_unpacked():
    ids = _labels(10, N, 4)
    mask = torch.ones(N, 4, dtype=torch.float64)
    mask[1, 2:] = 0
    assert_matches(TokensAndMask(), nn.CrossEntropyLoss(reduction="sum"), (ids, mask),
                   _labels(C, N))


@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple"])
def test_several_outputs_and_targets(kind):
    y = (_labels(C, N), _randn(N, 2))
    assert_matches(TwoHeads(kind), multitask, _randn(N, D), y,
                   ("batch_grad", "diag_ggn_exact", "diag_h"))


def test_several_outputs_monte_carlo():
    """A weighted sum of built-in losses on several outputs samples each loss's factor
    (``√w_i S_i``, independent draws): ``diag_ggn_mc`` converges to ``diag_ggn_exact``
    (seeded, 20000 samples: within 2 %), ``kfac`` and ``kflr`` run; a negatively weighted
    loss makes the sampled curvature undefined and raises when the step runs."""
    model, y = TwoHeads("dict").double(), (_labels(C, N), _randn(N, 2))
    x = _randn(N, D)
    torch.manual_seed(0)
    exact = fxcurv.compile(model, multitask, ["diag_ggn_exact"])(x, y)[2]
    sampled = fxcurv.compile(model, multitask, ["diag_ggn_mc"], mc_samples=20000)(x, y)[2]
    for name in exact:
        assert (sampled[name] - exact[name]).norm() <= 0.02 * exact[name].norm(), name
    _, _, kfac, kflr = fxcurv.compile(model, multitask, ["kfac", "kflr"])(x, y)
    assert kfac["body.weight"][0].shape == kflr["body.weight"][0].shape == (D, D)
    joined = BodyAndHead(lambda logits, h: torch.cat([logits, h[:, :2]], 1)).double()

    def joined_loss(out, labels):
        boxes = labels.to(out.dtype)[:, None].expand(-1, 2)
        return multitask({"logits": out[:, :C], "box": out[:, C:]}, (labels, boxes))

    step = fxcurv.compile(joined, joined_loss, ["kfac"])  # tensors only: scriptable
    torch.manual_seed(1)
    ours = step(x, y[0])[2]
    torch.manual_seed(1)
    scripted = torch.jit.script(step)(x, y[0])[2]
    for name in ours:
        for a, b in zip(ours[name], scripted[name]):
            torch.testing.assert_close(a, b)

    def less_box(out, t):
        return multitask(out, t) - 0.1 * F.mse_loss(_box(out), t[1], reduction="sum")

    with pytest.raises(ValueError, match="negative weight"):
        fxcurv.compile(model, less_box, ["kfac"])(x, y)


class BodyAndHead(nn.Module):
    """``wrap(logits, features)`` of a one-layer body and a head: the container under test."""

    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap
        self.body, self.head = nn.Linear(D, D), nn.Linear(D, C)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.wrap(self.head(h), h)


def test_one_output_read():
    """A model returning ``(logits, features)`` whose loss reads the logits alone: the logits
    are the model output, nothing is joined."""
    def loss_fn(out, y):
        return F.cross_entropy(out[0], y, reduction="sum")

    assert_matches(BodyAndHead(lambda logits, h: (logits, h)), loss_fn, _randn(N, D),
                   _labels(C, N))
    step = fxcurv.compile(BodyAndHead(lambda logits, h: (logits, h)).double(), loss_fn,
                          ["diag_ggn_exact"])
    assert "model_outputs" not in step.code


def test_googlenet_train_mode_aux_logits():
    """torchvision's GoogLeNet in train mode returns ``GoogLeNetOutputs(logits, aux2, aux1)``;
    the usual loss weighs the auxiliary heads by 0.3. Its gradient equals eager autograd
    (BatchNorm in train mode: per-sample quantities are refused, ``kfac`` runs on the coupled
    batch)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False,
                                         num_classes=4, dropout=0.0, dropout_aux=0.0).double()
    model.train()

    def loss_fn(out, y):
        return F.cross_entropy(out.logits, y) + 0.3 * (F.cross_entropy(out.aux_logits1, y) +
                                                       F.cross_entropy(out.aux_logits2, y))

    x, y = _randn(2, 3, 64, 64), _labels(4, 2)
    loss, gradient = fxcurv.compile(model, loss_fn)(x, y)
    expected = loss_fn(model(x), y)
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(gradient[name], p.grad, rtol=1e-8, atol=1e-12)
    with pytest.raises(fxcurv.CompileError, match="BatchNorm in train mode"):
        fxcurv.compile(model, loss_fn, ["batch_l2"])
    kfac = fxcurv.compile(model, loss_fn, ["kfac"])(x, y)[2]
    assert all(torch.isfinite(f).all() for factors in kfac.values() for f in factors)


def test_structured_input_errors():
    step = fxcurv.compile(ImageAndMeta().double(), nn.CrossEntropyLoss())
    y = _labels(C, N)
    with pytest.raises(ValueError, match=r"reads \['img'\].*got a tensor"):
        step(_randn(N, D), y)
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        step({"img": _randn(N, D), "meta": _randn(N + 1, 2)}, y)
    with pytest.raises(ValueError, match="must be a tensor"):
        step({"img": _randn(N, D), "meta": [1.0, 2.0]}, y)
    with pytest.raises(ValueError, match="dtype"):
        step({"img": _randn(N, D).float(), "meta": _randn(N, 2)}, y)
    with pytest.raises(ValueError, match="target y has 4 samples"):
        step({"img": _randn(N, D), "meta": _randn(N, 2)}, y[:4])


def test_structured_input_export_not_script():
    """``torch.export`` exports a dict-input step; TorchScript refuses it, saying why."""
    step = fxcurv.compile(ImageAndMeta().double(), nn.CrossEntropyLoss(), ["diag_ggn_exact"])
    x, y = {"img": _randn(N, D), "meta": _randn(N, 2)}, _labels(C, N)
    expected = step(x, y)
    exported = torch.export.export(step, (x, y)).module()
    for value, want in zip(pytree.tree_leaves(exported(x, y)), pytree.tree_leaves(expected)):
        torch.testing.assert_close(value, want)
    with pytest.raises(RuntimeError, match="torch.jit.script cannot script"):
        torch.jit.script(step)


def test_readable_code():
    step = fxcurv.compile(ImageAndMeta().double(), nn.CrossEntropyLoss())
    assert "x_img = fxcurv_rules_indexing_input_part(x_checked, 'img')" in step.code


class LastToken(nn.Module):
    """A sequence classifier pooling the last non-padding token, as Hugging Face's
    ``...ForSequenceClassification`` heads do: ``h[torch.arange(N), lengths - 1]``."""

    def __init__(self, rows_from_time: bool = False):
        super().__init__()
        self.rows_from_time = rows_from_time
        self.emb, self.lin, self.head = nn.Embedding(10, D), nn.Linear(D, D), nn.Linear(D, C)

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids)))
        last = (ids != 0).sum(-1) - 1
        rows = torch.arange(ids.shape[1 if self.rows_from_time else 0], device=ids.device)
        return self.head(h[rows, last])


def test_last_token_pooling():
    ids = _labels(9, N, 4) + 1
    ids[0, 2:] = 0
    ids[3, 3:] = 0
    assert_matches(LastToken(), nn.CrossEntropyLoss(reduction="sum"), ids, _labels(C, N),
                   ("batch_grad", "diag_ggn_exact", "diag_h"))
    step = fxcurv.compile(LastToken().double(), nn.CrossEntropyLoss(), ["kfac"])
    assert "per_sample_take" in step.code
    with pytest.raises(ValueError, match="picks one entry per sample"):
        fxcurv.compile(LastToken(rows_from_time=True).double(), nn.CrossEntropyLoss(),
                       ["batch_grad"])(ids, _labels(C, N))


def test_dataclass_output():
    """A forward returning a dataclass (as Hugging Face's ``ModelOutput``) read by field."""
    from dataclasses import dataclass

    @dataclass
    class Output:
        logits: torch.Tensor
        hidden: torch.Tensor = None

    pytree.register_dataclass(Output)  # for the reference's flattening only

    def loss_fn(out, y):
        return F.cross_entropy(out.logits, y, reduction="sum") + (out.hidden ** 2).sum()

    model = BodyAndHead(lambda logits, h: Output(logits=logits, hidden=h))
    assert_matches(model, loss_fn, _randn(N, D), _labels(C, N),
                   ("batch_grad", "diag_ggn_exact", "diag_h"))


def test_dict_input_monte_carlo_as_joined_input():
    """Monte-Carlo quantities of a dict-input model equal those of the same model reading the
    parts from one joined tensor, drawn with the same seed."""
    class Joined(nn.Module):
        def __init__(self, parts: ImageAndMeta):
            super().__init__()
            self.img, self.extra, self.head = parts.img, parts.extra, parts.head

        def forward(self, z):
            return self.head(torch.tanh(self.img(z[:, :D]) + self.extra(z[:, D:])))

    model = ImageAndMeta().double()
    x, y = {"img": _randn(N, D), "meta": _randn(N, 2)}, _labels(C, N)
    results = []
    for net, data in ((model, x), (Joined(model), torch.cat([x["img"], x["meta"]], 1))):
        torch.manual_seed(3)
        results.append(fxcurv.compile(net, nn.CrossEntropyLoss(), ["kfac", "diag_ggn_mc"],
                                      mc_samples=2)(data, y)[2:])
    for ours, joined in zip(*results):
        for k in ours:
            for a, b in zip(pytree.tree_leaves(ours[k]), pytree.tree_leaves(joined[k])):
                torch.testing.assert_close(a, b)


def test_deeplabv3_with_its_auxiliary_head():
    """torchvision's DeepLabV3 returns ``{"out": ..., "aux": ...}``; its training loss adds
    half the auxiliary head's cross-entropy. The gradient equals autograd, ``kfac`` (sampled
    from both losses) gives every parameter its factors."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3, aux_loss=True).eval()

    def loss_fn(out, y):
        return F.cross_entropy(out["out"], y) + 0.5 * F.cross_entropy(out["aux"], y)

    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    loss, gradient, kfac = fxcurv.compile(model, loss_fn, ["kfac"])(x, y)
    expected = loss_fn(model(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(gradient[name], p.grad, rtol=1e-4, atol=1e-6)
        assert all(torch.isfinite(f).all() for f in kfac[name]), name


def test_an_integer_output_is_read_as_it_is():
    """A model returning ``(logits, logits.argmax(1))`` whose loss reads both: the
    predictions (no derivative) are not joined with the logits, so they stay integers."""
    def loss_fn(out, y):
        logits, predicted = out
        picked = logits.gather(1, predicted[:, None]).sum()
        return F.cross_entropy(logits, y, reduction="sum") + 0.1 * picked

    model = BodyAndHead(lambda logits, h: (logits, logits.argmax(1)))
    assert_matches(model, loss_fn, _randn(N, D), _labels(C, N))
