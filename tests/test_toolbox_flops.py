"""FLOPs / params table: hand-computed counts for a conv and a linear layer, and the CLI."""

from __future__ import annotations

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from cbir.toolbox.cli import flops
from cbir.toolbox.flops import count_flops, parse_shape


def test_conv_flops_match_hand_count() -> None:
    conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
    r = count_flops(conv, (2, 3, 32, 32))
    macs = 2 * 16 * 16 * 16 * 3 * 3 * 3  # B * C_out * H_out * W_out * C_in * k * k
    assert r.macs == macs and r.flops == 2 * macs
    assert r.params == 16 * 3 * 9 + 16
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_flops(dw, (1, 8, 10, 10)).macs == 8 * 10 * 10 * 9  # C_in / groups = 1


def test_linear_flops_match_hand_count() -> None:
    lin = nn.Linear(128, 10)
    r = count_flops(lin, (4, 128))
    assert r.macs == 4 * 128 * 10 and r.flops == 2 * 4 * 128 * 10
    assert r.params == 128 * 10 + 10


def test_per_module_rows_add_up() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)),
    )
    r = count_flops(model, (1, 3, 8, 8))
    rows = {row.name: row for row in r.rows}
    assert rows["0"].flops == 2 * 8 * 64 * 27
    assert rows["2"].flops == rows["2.0"].flops + rows["2.2"].flops
    assert r.flops == rows["0"].flops + rows["2"].flops
    assert r.params == sum(p.numel() for p in model.parameters())
    table = r.table(depth=1)
    assert "2.0" not in table and "total" in table and "MFLOPs" in table  # small: in M
    assert model.training  # mode restored


def test_parse_shape() -> None:
    assert parse_shape("1x3x224x224") == (1, 3, 224, 224)
    assert parse_shape("2,3,32,32") == (2, 3, 32, 32)
    with pytest.raises(ValueError):
        parse_shape("1xthree")


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(flops)
    return app


def test_cli_on_toolbox_modules() -> None:
    runner = CliRunner()
    res = runner.invoke(_app(), ["cbam", "--input", "1x32x16x16"])
    assert res.exit_code == 0, res.output
    assert "channel" in res.output and "total" in res.output
    res = runner.invoke(_app(), ["fpn", "--input", "1x8x32x32", "--depth", "1"])
    assert res.exit_code == 0, res.output


def test_cli_unknown_name_is_a_one_line_error() -> None:
    res = CliRunner().invoke(_app(), ["no_such_net_xyz", "--input", "1x3x32x32"])
    assert res.exit_code == 2
    assert "no_such_net_xyz" in res.output
    res = CliRunner().invoke(_app(), ["cbam", "--input", "1xabc"])
    assert res.exit_code == 2


def test_cli_default_backbone_gflops() -> None:
    pytest.importorskip("timm")
    res = CliRunner().invoke(_app(), ["efficientnet_lite0", "--input", "1x3x224x224", "--depth", "1"])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    gflops = float(last.split(":")[1].split("GFLOPs")[0])
    assert 0.76 < gflops < 0.78  # tf_efficientnet_lite0: 0.385 GMACs at 224
    assert "4.65M params" in last
    torch.manual_seed(0)
