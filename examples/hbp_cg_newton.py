r"""HBP tutorial (seed 003): one linear layer on MNIST trained by CG-Newton over curvature blocks.

Each iteration solves, per parameter block (weight, bias), ``(C + αI) d = −g`` by conjugate
gradients, with ``C`` the block of the GGN, the Hessian or the positive-curvature Hessian,
and applies ``p ← p + lr · d`` (``fxcurv.optim.CGNewton``). The products ``C v`` come from one
compiled step (``ggnmp``, ``hmp``, ``pchmp_abs`` or ``pchmp_clip``). For a single linear layer
all four curvatures are the same matrix (the layer adds no second-order terms).

Run: ``python examples/hbp_cg_newton.py [--curvature {ggn,hessian,pch_abs,pch_clip}]``.
"""
from __future__ import annotations

import argparse
import time

import torch

import fxcurv
from common import accuracy, held_out_accuracy, save_curves
from mnist_data import load_mnist


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--curvature", default="ggn", choices=sorted(fxcurv.optim.CURVATURES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the tutorial's 500; 100 on a data set of fewer than "
                             "5,000 images (the offline digits), so an epoch has 15 steps, not 3")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.02,
                        help="HBP regularisation in [0, 1]: solve ((1 - alpha) C + alpha I) d = -g")
    parser.add_argument("--cg-maxiter", type=int, default=50)
    parser.add_argument("--cg-atol", type=float, default=0.0)
    parser.add_argument("--cg-tol", type=float, default=0.1)
    parser.add_argument("--print-every", type=int, default=5)
    parser.add_argument("--plot", default=None,
                        help="where to save the plot (default: hbp_cg_newton_CURVATURE.png)")
    args = parser.parse_args()
    args.plot = args.plot or f"hbp_cg_newton_{args.curvature}.png"
    return args


def train_epoch(model, step, optimizer, loader, epoch: int, args, history: dict) -> None:
    """One pass over ``loader``; logs like the tutorial every ``print_every`` iterations."""
    for i, (images, labels) in enumerate(loader):
        with torch.no_grad():
            batch_accuracy = accuracy(model(images), labels)
        loss = optimizer.step(lambda vectors: step(images, labels, vectors))
        cg_iterations = max(optimizer.state[p]["cg_iterations"] for p in model.parameters())
        history["epoch"].append(epoch + (i + 1) / len(loader))
        history["loss"].append(loss.item())
        history["accuracy"].append(batch_accuracy)
        if i % args.print_every == 0:
            print(f"Epoch [{epoch + 1}/{args.epochs}], Iter. [{i + 1}/{len(loader)}], "
                  f"Loss: {loss.item():.4f}, Acc.: {batch_accuracy:.4f}, "
                  f"CG iterations: {cg_iterations}")


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    train_set, source = load_mnist(args.data_dir, train=True)
    test_set, _ = load_mnist(args.data_dir, train=False, download=False)
    batch_size = args.batch_size or (500 if len(train_set) >= 5000 else 100)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    optimizer = fxcurv.optim.CGNewton(
        model.named_parameters(), lr=args.lr, alpha=args.alpha, cg_atol=args.cg_atol,
        cg_tol=args.cg_tol, cg_maxiter=args.cg_maxiter, curvature=args.curvature)
    step = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), [optimizer.quantity])
    print(f"Data: {source}, {len(train_set)} training images, batch size {batch_size}. "
          f"Curvature: {args.curvature} (the step computes {optimizer.quantity}).")

    history = {"epoch": [], "loss": [], "accuracy": []}
    for epoch in range(args.epochs):
        train_epoch(model, step, optimizer, loader, epoch, args, history)

    save_curves(history["epoch"], {"batch loss": history["loss"],
                                   "batch accuracy": history["accuracy"]}, args.plot, "epoch")
    print(f"Final batch loss {history['loss'][-1]:.4f}; held-out accuracy "
          f"{100 * held_out_accuracy(model, test_set):.1f}% on {len(test_set)} images. "
          f"Plot: {args.plot}. Time: {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    main()
