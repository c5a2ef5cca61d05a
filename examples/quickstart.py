"""fxcurv quickstart: the seed MNIST CNN compiled with every first-order quantity.

Prints part of the generated step's code and a table of the shapes it returns, then checks
the gradient against torch.autograd. Run: ``python examples/quickstart.py``.
"""
from __future__ import annotations

import argparse
import time

import torch

import fxcurv
from fxcurv.bench.report import render as table
from common import seed_cnn
from mnist_data import load_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--code-lines", type=int, default=40, help="lines of code to show")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)

    dataset, source = load_mnist(args.data_dir)
    x, y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                                 shuffle=True)))
    x, y = x.to(args.device), y.to(args.device)
    model = seed_cnn().to(args.device)
    loss_fn = torch.nn.CrossEntropyLoss()
    quantities = ["batch_grad", "batch_l2", "sum_grad_squared", "variance"]
    step = fxcurv.compile(model, loss_fn, quantities)

    code = step.code.strip().splitlines()
    backward_at = next(i for i, line in enumerate(code) if "loss_cotangent" in line)
    half = args.code_lines // 2
    print(f"Generated step: {len(code)} lines of Python. Its start (the forward):\n")
    print("\n".join(code[:half]))
    print("    ...\n\nand where the explicit backward begins:\n")
    print("\n".join(code[backward_at - 1:backward_at - 1 + half]))
    print("    ...\n")

    loss, grad, *results = step(x, y)
    print(f"Data: {source}, batch {tuple(x.shape)} on {x.device}; loss {loss.item():.4f}\n")
    rows = [[name, tuple(grad[name].shape)] + [tuple(r[name].shape) for r in results]
            for name in grad]
    print(table(["parameter", "grad"] + quantities, rows, "plain"))

    model.zero_grad()
    loss_fn(model(x), y).backward()
    worst = max((grad[n] - p.grad).abs().max().item() for n, p in model.named_parameters())
    print(f"\nmax |grad - autograd grad| = {worst:.2e}. Data: {source}. "
          f"Time: {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    main()
