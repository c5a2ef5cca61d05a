r"""Data-parallel training with a KFAC-preconditioned optimizer, on torch.distributed.

Every rank holds a shard of each global mini-batch (the shards may differ in size). One step
compiled with ``process_group=`` returns, on every rank, the loss, the gradient and the
Kronecker factors ``[G, A]`` of the *global* batch: the collectives are inside the generated
code (``--show-code`` prints them). Every rank then applies the same update

    W ← W − γ (Ḡ + √λ I)⁻¹ ∇W (Ā + √λ I)⁻¹,       b ← b − γ (Ḡ + λ I)⁻¹ ∇b,

with ``Ḡ, Ā`` running averages of the factors (decay ``ρ``) whose damped inverses are refreshed
every ``--inverse-every`` steps, so the parameters stay identical without further
communication. The model sits in ``DistributedDataParallel`` (which makes the initial
parameters equal); the step is compiled from ``ddp.module``, never calls autograd, so DDP's
gradient hooks never fire.

Run (CPU, gloo):   ``torchrun --nproc_per_node=2 examples/distributed_kfac.py``
     (GPUs, NCCL): the same on a machine with GPUs (one per process).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fxcurv
from common import accuracy, held_out_accuracy, seed_cnn
from mnist_data import load_mnist


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--batch-size", type=int, default=128, help="global, over all ranks")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--decay", type=float, default=0.95, help="running-average decay ρ")
    parser.add_argument("--inverse-every", type=int, default=10)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--print-every", type=int, default=20)
    parser.add_argument("--show-code", action="store_true",
                        help="print the collectives of the generated step (rank 0)")
    return parser.parse_args()


class KFAC:
    """Per-layer preconditioning with damped inverses of running-average Kronecker factors."""

    def __init__(self, named_params, lr: float, damping: float, decay: float,
                 inverse_every: int):
        self.params = dict(named_params)
        self.lr, self.damping, self.decay, self.every = lr, damping, decay, inverse_every
        self.factors: dict[str, list] = {}
        self.inverses: dict[str, list] = {}
        self.steps = 0

    @torch.no_grad()
    def step(self, grad: dict, kfac: dict) -> None:
        for name, p in self.params.items():
            self._average(name, kfac[name])
            if self.steps % self.every == 0:
                self.inverses[name] = self._damped_inverses(self.factors[name])
            p.sub_(self.lr * self._precondition(grad[name], self.inverses[name]))
        self.steps += 1

    def _average(self, name: str, factors: list) -> None:
        old = self.factors.get(name)
        self.factors[name] = list(factors) if old is None else [
            self.decay * a + (1 - self.decay) * f for a, f in zip(old, factors)]

    def _damped_inverses(self, factors: list) -> list:
        """``(F + d I)⁻¹`` with ``d = √λ`` per factor of a weight, ``λ`` for a bias's only one."""
        shift = self.damping ** 0.5 if len(factors) == 2 else self.damping
        return [torch.linalg.inv(f + shift * torch.eye(len(f), dtype=f.dtype, device=f.device))
                for f in factors]

    @staticmethod
    def _precondition(g: torch.Tensor, inverses: list) -> torch.Tensor:
        if len(inverses) == 1:                                  # bias: G⁻¹ ∇b
            return inverses[0] @ g
        g_inv, a_inv = inverses                                 # weight: G⁻¹ ∇W A⁻¹
        return (g_inv @ g.flatten(1) @ a_inv).reshape(g.shape)


def setup() -> tuple[int, int, torch.device]:
    """The process group torchrun describes (gloo on CPU, NCCL with one GPU per process)."""
    if "RANK" not in os.environ:
        raise SystemExit("Start with torchrun, e.g. "
                         "`torchrun --nproc_per_node=2 examples/distributed_kfac.py`.")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shards(dataset, batch_size: int, count: int, rank: int, world: int, device):
    """``count`` global batches from one shuffle shared by all ranks; this rank's part of each
    (sizes differ by at most one sample when ``world`` does not divide the batch)."""
    images, labels = dataset.tensors
    generator, done = torch.Generator().manual_seed(0), 0
    while True:
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(batch_size):
            if done == count:
                return
            done += 1
            part = batch.tensor_split(world)[rank]
            yield images[part].to(device), labels[part].to(device)


def main() -> None:
    args = parse_args()
    rank, world, device = setup()
    start = time.perf_counter()
    if rank != 0:
        dist.barrier()  # rank 0 downloads first, so every rank reads the same data
    with contextlib.redirect_stdout(sys.stdout if rank == 0 else io.StringIO()):
        train_set, source = load_mnist(args.data_dir, train=True, download=rank == 0)
        test_set, _ = load_mnist(args.data_dir, train=False, download=False)
    if rank == 0:
        dist.barrier()
    torch.manual_seed(0)
    ddp = DistributedDataParallel(seed_cnn().to(device))  # broadcasts rank 0's parameters
    torch.manual_seed(1000 + rank)  # independent Monte-Carlo samples on every rank
    step = fxcurv.compile(ddp.module, torch.nn.CrossEntropyLoss(), ["kfac"],
                          process_group=ddp.process_group)
    if rank == 0:
        print(f"Data: {source}; {world} ranks ({device.type}), global batch {args.batch_size}.")
        if args.show_code:
            print("\n".join(line for line in step.code.splitlines() if "_c10d_functional" in line))
    optimizer = KFAC(ddp.module.named_parameters(), args.lr, args.damping, args.decay,
                     args.inverse_every)
    for iteration, (x, y) in enumerate(
            shards(train_set, args.batch_size, args.max_iter, rank, world, device), 1):
        show = rank == 0 and (iteration == 1 or iteration % args.print_every == 0)
        if show:
            with torch.no_grad():
                shard_accuracy = accuracy(ddp.module(x), y)
        loss, grad, kfac = step(x, y)  # global loss, gradient and factors on every rank
        optimizer.step(grad, kfac)
        if show:
            print(f"Iteration {iteration:3d}/{args.max_iter}   global loss {loss.item():.3f}   "
                  f"rank-0 shard accuracy {100 * shard_accuracy:.0f}%")
    report(ddp.module, test_set, rank, world, device, start)
    dist.destroy_process_group()


def report(model, test_set, rank: int, world: int, device, start: float) -> None:
    """Held-out accuracy on rank 0, and a check that every rank has the same parameters."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    if rank == 0:
        model = model.cpu()
        same = all(torch.equal(c.cpu(), flat.cpu()) for c in copies)
        print(f"Held-out accuracy {100 * held_out_accuracy(model, test_set):.1f}% on "
              f"{len(test_set)} images; parameters identical on all {world} ranks: {same}. "
              f"Time: {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    main()
