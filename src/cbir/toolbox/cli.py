"""``cbir flops MODEL_OR_MODULE --input 1x3x224x224``: a per-module FLOPs / params table
(docs/toolbox.md); ``cbir.cli`` registers `flops` on the main app."""

from __future__ import annotations

import sys
from typing import Annotated

import torch
import typer
from torch import nn

from cbir.toolbox.flops import count_flops, parse_shape

__all__ = ["build_for_flops", "flops"]

#: Short names of backbones used elsewhere in cbir -> timm names.
MODEL_ALIASES = {"efficientnet_lite0": "tf_efficientnet_lite0"}


def build_for_flops(name: str, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor | list[torch.Tensor]]:
    """The module for ``name`` and a matching random input; ``KeyError`` if unknown.

    ``name`` is a toolbox module (built for the input's channels; pyramid necks get three levels
    of ``C, 2C, 4C`` channels at ``H, H/2, H/4``), else a timm model (random weights: FLOPs do not
    depend on them), ``efficientnet_lite0`` being timm's ``tf_efficientnet_lite0``."""
    from cbir.toolbox.registry import get_entry

    try:
        entry = get_entry(name)
    except KeyError:
        import timm

        timm_name = MODEL_ALIASES.get(name, name)
        if not timm.is_model(timm_name):
            raise KeyError(name) from None
        in_chans = shape[1] if len(shape) == 4 else 3
        return timm.create_model(timm_name, pretrained=False, in_chans=in_chans), torch.randn(shape)
    if entry.input_kind == "none":
        return entry.build(), torch.randn(shape)
    if len(shape) != 4:
        raise ValueError(f"toolbox module {name!r} needs a BxCxHxW input, got {'x'.join(map(str, shape))}")
    b, c, h, w = shape
    if entry.input_kind == "channels":
        return entry.build(c), torch.randn(shape)
    chans = [c, 2 * c, 4 * c]
    sizes = [(h, w), ((h + 1) // 2, (w + 1) // 2), ((h + 3) // 4, (w + 3) // 4)]  # H, H/2, H/4 rounded up
    return entry.build(chans), [torch.randn(b, ci, hi, wi) for ci, (hi, wi) in zip(chans, sizes)]


def flops(
    model: Annotated[str, typer.Argument(metavar="MODEL_OR_MODULE", help="Toolbox module (e.g. cbam, aspp, fpn), "
                                         "efficientnet_lite0, or a timm model name.")],
    input: Annotated[str, typer.Option("--input", "-i", help="Input shape BxCxHxW.")] = "1x3x224x224",  # noqa: A002
    depth: Annotated[int, typer.Option("--depth", "-d", help="Nesting depth of the per-module rows "
                                                             "(0 = total only).")] = 2,
) -> None:
    """Print FLOPs (= 2 x MACs), MACs and parameters per module for one forward pass."""
    try:
        module, x = build_for_flops(model, parse_shape(input))
    except KeyError:
        raise typer.BadParameter(f"unknown model or module {model!r} (not a toolbox module nor a timm model)",
                                 param_hint="MODEL_OR_MODULE") from None
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--input") from None
    typer.echo(f"{model}: " + type(module).__name__)
    typer.echo(count_flops(module, x).table(depth))


if __name__ == "__main__":  # pragma: no cover - `python -m cbir.toolbox.cli efficientnet_lite0`
    app = typer.Typer(add_completion=False)
    app.command()(flops)
    sys.exit(app())
