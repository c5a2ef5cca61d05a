"""What the examples share: the seed CNN, accuracy, and a plot of training curves."""
from __future__ import annotations

import torch


def seed_cnn() -> torch.nn.Sequential:
    """The MNIST CNN of BackPACK's DiagGGN example (seeds 000 and 001)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 20, 5, 1), torch.nn.ReLU(), torch.nn.MaxPool2d(2, 2),
        torch.nn.Conv2d(20, 50, 5, 1), torch.nn.ReLU(), torch.nn.MaxPool2d(2, 2),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 50, 500), torch.nn.ReLU(), torch.nn.Linear(500, 10),
    )


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose arg-max output is the label."""
    return (outputs.argmax(dim=1) == labels).float().mean().item()


def held_out_accuracy(model: torch.nn.Module, dataset, chunk: int = 1000) -> float:
    """Accuracy on a ``TensorDataset``, evaluated in chunks without gradients."""
    images, labels = dataset.tensors
    with torch.no_grad():
        correct = sum(accuracy(model(x), y) * len(y)
                      for x, y in zip(images.split(chunk), labels.split(chunk)))
    return correct / len(labels)


def save_curves(steps: list, curves: dict, path: str, xlabel: str) -> None:
    """One panel per curve (``{"loss": [...], "accuracy": [...]}``) against ``steps``, as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3))
    for ax, (name, values) in zip(axes, curves.items()):
        ax.plot(steps, values)
        ax.set(xlabel=xlabel, ylabel=name)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
