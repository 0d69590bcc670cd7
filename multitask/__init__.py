"""multitask: mask, gender and age from face photos, with Grad-CAM inspection.

``load_run(RUN_DIR)`` gives a trained run as a ``Predictor`` (``predict``, ``explain``, ``export``); see
``multitask.api``. Importing the package itself loads nothing heavy, so the ``multitask`` command stays fast.
"""
from __future__ import annotations

__all__ = ["load_run"]


def load_run(*args, **kwargs):
    """A trained run (or several) as a ``multitask.api.Predictor``; the arguments of ``multitask.api.load_run``."""
    from multitask.api import load_run as load

    return load(*args, **kwargs)
