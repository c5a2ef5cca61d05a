"""BackPACK's "example using all extensions" (seed 002), with fxcurv.

Every quantity on a linear MNIST model (``Flatten``, ``Linear(784, 10)``, cross-entropy) for
one batch, and a table of the shapes it returns per parameter: first-order quantities, GGN
diagonals (exact and Monte-Carlo, summed and per sample), Kronecker factors, Hessian
diagonals, square-root GGN factors, and block curvature products with ``V = 1`` and ``V = 3``
vectors. All non-product quantities come from one compiled step; the four products from a
second step that takes the vectors as a third argument.

Run: ``python examples/all_quantities.py``.
"""
from __future__ import annotations

import argparse
import time

import torch

import fxcurv
from fxcurv.bench.report import render as table
from mnist_data import load_mnist

# the quantities, in the order of seed 002 (grad_batch is BackPACK's name for batch_grad)
QUANTITIES = ["grad_batch", "variance", "sum_grad_squared", "batch_l2", "diag_ggn_mc",
              "diag_ggn_exact", "diag_ggn_mc_batch", "diag_ggn_exact_batch", "kfac", "kflr",
              "kfra", "diag_h", "diag_h_batch", "sqrt_ggn_exact", "sqrt_ggn_mc"]
PRODUCTS = ["hmp", "ggnmp", "pchmp_clip", "pchmp_abs"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--batch-size", type=int, default=512)
    return parser.parse_args()


def shape(value) -> str:
    """``[10, 784]``; a list of Kronecker factors as ``[[10, 10], [784, 784]]``."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shape(v) for v in value) + "]"
    return str(list(value.shape))


def quantity_rows(model, x, y, names: list) -> list:
    """One row per quantity: its name and its shape for every parameter."""
    step = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), list(QUANTITIES), mc_samples=1)
    loss, grad, *results = step(x, y)
    print(f"Loss {loss.item():.4f}. One step computes {len(QUANTITIES)} quantities.")
    rows = [["grad"] + [shape(grad[n]) for n in names]]
    for quantity, result in zip(QUANTITIES, results):
        rows.append([quantity] + [shape(result[n]) for n in names])
    return rows


def product_rows(model, x, y, names: list, count: int) -> list:
    """The vectors' shape and each product's shape, for ``count`` random vectors each."""
    step = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), PRODUCTS)
    params = dict(model.named_parameters())
    vectors = {n: torch.rand(count, *params[n].shape) for n in names}
    _, _, *products = step(x, y, vectors)
    rows = [[f"vec (V={count})"] + [shape(vectors[n]) for n in names]]
    rows += [[f"{q}(vec)"] + [shape(result[n]) for n in names]
             for q, result in zip(PRODUCTS, products)]
    return rows


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    dataset, source = load_mnist(args.data_dir, train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    x, y = next(iter(loader))
    print(f"Data: {source}; one batch {tuple(x.shape)}.")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    names = [n for n, _ in model.named_parameters()]

    rows = quantity_rows(model, x, y, names)
    rows += product_rows(model, x, y, names, 1) + product_rows(model, x, y, names, 3)
    print(table(["quantity"] + names, rows, "plain"))
    print(f"Data: {source}. Time: {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    main()
