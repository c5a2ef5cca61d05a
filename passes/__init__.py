"""Graph passes of the fxcurv compiler, installed as ``fxcurv.passes``.

Each pass is a small function over a ``torch.fx.Graph`` with one job; ``fxcurv.compile``
composes them in one pipeline.
"""
