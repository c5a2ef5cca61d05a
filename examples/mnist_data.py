"""MNIST for the examples: torchvision's MNIST when it can be had, else a real offline stand-in.

Order of preference:
1. torchvision's MNIST under ``data_dir`` (downloaded there first when the machine is online);
2. scikit-learn's bundled handwritten digits (1,797 real 8x8 scans that ship with the
   package), upscaled to 28x28 and normalised like MNIST — said on screen;
3. nothing else: we never present random numbers as MNIST.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.nn.functional as F

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist(data_dir: str = "./data", train: bool = True, download: bool = True):
    """A ``TensorDataset`` of ``[n, 1, 28, 28]`` float images and int64 labels, and its source.

    Set ``FXCURV_NO_DOWNLOAD=1`` to skip the download attempt (the tests do, offline).
    """
    download = download and not os.environ.get("FXCURV_NO_DOWNLOAD")
    dataset = _torchvision_mnist(data_dir, train, download)
    if dataset is not None:
        return dataset, "torchvision MNIST"
    print("MNIST is not available offline here: using scikit-learn's bundled handwritten "
          "digits (8x8 scans, upscaled to 28x28) instead.")
    return _sklearn_digits(train), "scikit-learn digits (offline stand-in for MNIST)"


def _torchvision_mnist(data_dir: str, train: bool, download: bool):
    try:
        import torchvision
    except ImportError:
        return None
    transform = torchvision.transforms.Compose([
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)),
    ])
    for attempt_download in ([False, True] if download else [False]):
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(5)
        try:
            return torchvision.datasets.MNIST(data_dir, train=train, download=attempt_download,
                                              transform=transform)
        except Exception:  # noqa: BLE001 - not there, or offline
            continue
        finally:
            socket.setdefaulttimeout(previous)
    return None


def _sklearn_digits(train: bool) -> torch.utils.data.TensorDataset:
    """Digits 0-9 from scikit-learn, a fixed 80/20 split, shaped and scaled like MNIST."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(images, (4, 4, 4, 4))  # MNIST digits sit in a 20x20 box inside 28x28
    images = (images - MNIST_MEAN) / MNIST_STD
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(labels))
    chosen = order[:split] if train else order[split:]
    return torch.utils.data.TensorDataset(images[chosen], labels[chosen])
