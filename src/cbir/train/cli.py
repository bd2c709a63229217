"""``cbir train <what>``: one sub-command per trainable model, each from its own module.

A module listed in `TRAINERS` exposes a Typer command function named ``command``; a module
that is not there yet adds nothing.
"""

from __future__ import annotations

import importlib

import typer

# sub-command -> module with a ``command`` function
TRAINERS = {
    "segmenter": "cbir.train.segmenter",
    "detector": "cbir.train.detector",
    "tscam": "cbir.train.tscam",
}

train = typer.Typer(help="Train a localizer on `cbir synth` data (seeded, resumable, curves beside the weights).",
                    no_args_is_help=True)


def register(guard) -> typer.Typer:
    """Add every available trainer's command to the ``train`` group, each wrapped by ``guard``."""
    for name, module in TRAINERS.items():
        try:
            fn = importlib.import_module(module).command
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        train.command(name)(guard(fn))
    return train
