"""Toolbox layers: shapes over several input sizes, gradients, and each module's defining property."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cbir.toolbox import create_module, get_entry, list_modules
from cbir.toolbox.layers import (
    ASFF,
    ASPP,
    CBAM,
    ECA,
    FPN,
    FRN,
    PAN,
    PPM,
    SE,
    SPP,
    SPPF,
    BiFPN,
    ChannelAttention,
    DropBlock2d,
    FastNormalizedFusion,
    HardSwish,
    Mish,
    SpatialAttention,
    Swish,
    eca_kernel_size,
)

SIZES = [(8, 8), (13, 13), (20, 11)]


def _pyramid(b: int, chans: list[int], h: int, w: int) -> list[torch.Tensor]:
    feats = []
    for c in chans:
        feats.append(torch.randn(b, c, h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return feats


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_lists_every_module_of_the_issue() -> None:
    names = set(list_modules())
    expected = {
        "se",
        "cbam",
        "channel_attention",
        "sam",
        "eca",
        "spp",
        "sppf",
        "aspp",
        "rfb",
        "rfb_s",
        "ppm",
        "fpn",
        "pan",
        "bifpn",
        "asff",
        "mish",
        "swish",
        "silu",
        "hard_swish",
        "frn",
        "dropblock",
    }
    assert expected <= names
    assert list_modules("rfb*") == ["rfb", "rfb_s"]
    assert isinstance(create_module("cbam", channels=64), CBAM)
    assert get_entry("RFB-s").name == "rfb_s"
    with pytest.raises(KeyError, match="unknown toolbox module"):
        create_module("no_such_block", 3)


@pytest.mark.parametrize("name", list_modules())
def test_every_registered_module_shapes_and_gradients(name: str) -> None:
    entry = get_entry(name)
    c = 16
    for h, w in SIZES:
        if entry.input_kind == "pyramid":
            chans = [c, 2 * c, 4 * c]
            kwargs = {"out_channels": 8} if name in ("fpn", "pan") else {}
            m = create_module(name, chans, **kwargs).train()
            xs = [x.requires_grad_() for x in _pyramid(2, chans, h, w)]
            y = m(xs)
            outs = y if isinstance(y, list) else [y]
            if name == "asff":
                assert y.shape[-2:] == xs[0].shape[-2:]
            else:
                assert [o.shape[-2:] for o in outs] == [x.shape[-2:] for x in xs]
            loss = sum(o.square().mean() for o in outs)
            inputs = xs
        else:
            m = (create_module(name) if entry.input_kind == "none" else create_module(name, c)).train()
            x = torch.randn(2, c, h, w, requires_grad=True)
            y = m(x)
            assert y.shape[0] == 2 and y.shape[-2:] == (h, w), (name, y.shape)
            if name not in ("spp", "sppf", "aspp", "rfb", "rfb_s", "ppm"):  # these map C_in -> C_out
                assert y.shape == x.shape
            loss = y.square().mean()
            inputs = [x]
        loss.backward()
        for x in inputs:
            assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        for pname, p in m.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
        m.zero_grad()


# --- attention -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SE, ECA, ChannelAttention])
def test_channel_gates_are_in_unit_interval_and_applied_per_channel(cls: type[nn.Module]) -> None:
    m = cls(32)
    x = torch.randn(3, 32, 9, 7)
    g = m.gate(x)
    assert g.shape == (3, 32, 1, 1)
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(m(x), x * g)
    # One weight per (sample, channel): the output / input ratio is constant over H x W.
    ratio = m(x) / x
    torch.testing.assert_close(ratio, ratio[..., :1, :1].expand_as(ratio))


def test_spatial_gate_is_in_unit_interval_and_applied_per_location() -> None:
    m = SpatialAttention(kernel_size=7)
    x = torch.randn(2, 8, 10, 12)
    g = m.gate(x)
    assert g.shape == (2, 1, 10, 12)
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(m(x), x * g)


def test_cbam_is_channel_then_spatial() -> None:
    m = CBAM(32, reduction=4)
    x = torch.randn(2, 32, 6, 5)
    mc = m.channel.gate(x)
    y = x * mc
    ms = m.spatial.gate(y)
    assert ((mc > 0) & (mc < 1)).all() and ((ms > 0) & (ms < 1)).all()
    torch.testing.assert_close(m(x), y * ms)


def test_se_depends_only_on_global_average() -> None:
    # Squeeze = global average pooling: permuting the pixels does not change the gate.
    m = SE(16, reduction=4)
    x = torch.randn(2, 16, 5, 5)
    perm = torch.randperm(25)
    xp = x.flatten(2)[..., perm].reshape_as(x)
    torch.testing.assert_close(m.gate(x), m.gate(xp))


def test_eca_adaptive_kernel_size() -> None:
    assert [eca_kernel_size(c) for c in (16, 64, 128, 256, 512, 1024, 2048)] == [3, 3, 5, 5, 5, 5, 7]
    assert ECA(2048).conv.kernel_size == (7,)
    assert ECA(64, kernel_size=9).conv.kernel_size == (9,)


def test_eca_interaction_is_local_across_channels() -> None:
    # Channel i's gate depends only on channels within k // 2 of i.
    m = ECA(64)  # k = 3
    x = torch.randn(1, 64, 4, 4)
    x2 = x.clone()
    x2[:, 40] += 5.0
    changed = (m.gate(x) - m.gate(x2)).abs().flatten() > 1e-7
    assert changed.nonzero().flatten().tolist() == [39, 40, 41]


# --- receptive field blocks ----------------------------------------------------------------


def test_spp_keeps_size_and_sppf_equals_spp() -> None:
    spp, sppf = SPP(16, 24).eval(), SPPF(16, 24).eval()
    sppf.load_state_dict(spp.state_dict())  # same cv1 / cv2; pools have no weights
    for h, w in [(7, 7), (13, 10), (32, 32)]:
        x = torch.randn(2, 16, h, w)
        y = spp(x)
        assert y.shape == (2, 24, h, w)
        torch.testing.assert_close(sppf(x), y)


def test_aspp_with_all_rates_one_equals_plain_convs() -> None:
    m = ASPP(8, 12, rates=(1, 1, 1), hidden_channels=6).eval()
    x = torch.randn(2, 8, 11, 9)
    for branch in m.branches[1:4]:
        plain = F.conv2d(x, branch.conv.weight, padding=1)  # an ordinary 3x3 conv
        torch.testing.assert_close(branch(x), F.relu(branch.bn(plain)))
        assert branch.conv.dilation == (1, 1)
    assert m(x).shape == (2, 12, 11, 9)


def test_aspp_dilated_branch_equals_zero_inserted_kernel() -> None:
    # A 3x3 conv at rate r is a (r - 1)(3 - 1) + 3 kernel with zeros between the taps.
    m = ASPP(4, 4, rates=(2, 3, 4), hidden_channels=3).eval()
    x = torch.randn(1, 4, 16, 16)
    for branch, r in zip(m.branches[1:4], (2, 3, 4)):
        w = branch.conv.weight
        k = (r - 1) * 2 + 3
        big = torch.zeros(w.shape[0], w.shape[1], k, k)
        big[..., ::r, ::r] = w
        torch.testing.assert_close(branch.conv(x), F.conv2d(x, big, padding=k // 2))


def test_aspp_pooling_branch_is_constant_over_space() -> None:
    m = ASPP(4, 4, hidden_channels=3).eval()
    y = m.branches[4](torch.randn(2, 4, 9, 7))
    torch.testing.assert_close(y, y[..., :1, :1].expand_as(y))


@pytest.mark.parametrize("size", [(4, 4), (6, 6), (13, 9), (30, 30)])
def test_ppm_keeps_input_size(size: tuple[int, int]) -> None:
    m = PPM(16, 8).train()
    assert m.bins == (1, 2, 3, 6)
    y = m(torch.randn(2, 16, *size))
    assert y.shape == (2, 8, *size)


def test_ppm_branches_pool_to_their_bins() -> None:
    m = PPM(8).eval()
    x = torch.randn(1, 8, 12, 12)
    for stage, b in zip(m.stages, (1, 2, 3, 6)):
        assert stage(x).shape[-2:] == (b, b)


def test_rfb_receptive_fields_follow_the_dilations() -> None:
    from cbir.toolbox.layers import RFB, RFBs
    from cbir.toolbox.receptive_field import empirical_receptive_field

    # Largest RFB branch: 1x1, 3x3, 3x3, 3x3 @ rate 5 -> 1 + 2 + 2 + 10 = 15.
    assert empirical_receptive_field(RFB(16), input_size=41, channels=16) == (15, 15)
    assert empirical_receptive_field(RFB(16, rates=(1, 2, 3)), input_size=41, channels=16) == (11, 11)
    # Largest RFB-s branch: 1x1, 1x3, 3x1, 3x3 @ rate 5 -> 13 x 13.
    assert empirical_receptive_field(RFBs(16), input_size=41, channels=16) == (13, 13)


# --- fusion ----------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(32, 32), (15, 21)])
def test_fpn_and_pan_keep_level_sizes(h: int, w: int) -> None:
    chans = [8, 16, 32]
    xs = _pyramid(2, chans, h, w)
    for m in (FPN(chans, 12), PAN(chans, 12), PAN(chans, 12, fuse="concat")):
        ys = m.eval()(xs)
        assert [y.shape for y in ys] == [(2, 12, *x.shape[-2:]) for x in xs]


def test_fpn_is_top_down_only_and_pan_adds_bottom_up() -> None:
    chans = [4, 8, 16]
    for cls, coarse_sees_fine in ((FPN, False), (PAN, True)):
        xs = [x.requires_grad_() for x in _pyramid(1, chans, 16, 16)]
        ys = cls(chans, 8).eval()(xs)
        ys[-1].sum().backward()  # coarsest output
        assert (xs[0].grad is not None and bool(xs[0].grad.abs().sum() > 0)) is coarse_sees_fine
        xs = [x.detach().requires_grad_() for x in xs]
        cls(chans, 8).eval()(xs)[0].sum().backward()  # finest output sees every level
        assert all(x.grad.abs().sum() > 0 for x in xs)


def test_bifpn_weights_nonnegative_and_normalised() -> None:
    m = BiFPN([8, 8, 16, 32], channels=8)
    with torch.no_grad():
        for i, f in enumerate(m.fusion_modules()):
            f.weight.copy_(torch.linspace(-1.0, 2.0, f.weight.numel()) * (i + 1))
    for f in m.fusion_modules():
        w = f.normalized_weights()
        assert (w >= 0).all()
        assert w.sum() <= 1 and w.sum() > 1 - 1e-3
    fuse = FastNormalizedFusion(3)
    with torch.no_grad():
        fuse.weight.copy_(torch.tensor([2.0, -1.0, 1.0]))
    xs = [torch.randn(1, 2, 3, 3) for _ in range(3)]
    torch.testing.assert_close(fuse(xs), (2 * xs[0] + xs[2]) / (3 + fuse.eps))
    ys = m(_pyramid(2, [8, 8, 16, 32], 24, 24))
    assert [y.shape[-2:] for y in ys] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    assert all(y.shape[1] == 8 for y in ys)


def test_bifpn_layers_stack() -> None:
    m = nn.Sequential(BiFPN([4, 8, 16], channels=8), BiFPN(8, n_levels=3))
    ys = m(_pyramid(1, [4, 8, 16], 16, 16))
    assert [y.shape for y in ys] == [(1, 8, 16, 16), (1, 8, 8, 8), (1, 8, 4, 4)]


@pytest.mark.parametrize("level", [0, 1, 2])
def test_asff_weights_are_a_per_pixel_softmax(level: int) -> None:
    chans = [8, 16, 32]
    m = ASFF(chans, level=level, out_channels=10).eval()
    xs = _pyramid(2, chans, 20, 20)
    w = m.fusion_weights(xs)
    ref = xs[level]
    assert w.shape == (2, 3, *ref.shape[-2:])
    assert ((w > 0) & (w < 1)).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2, *ref.shape[-2:]))
    assert m(xs).shape == (2, 10, *ref.shape[-2:])


# --- activations and normalisation -----------------------------------------------------------


def test_activations_match_their_formulas() -> None:
    x = torch.linspace(-8, 8, 101)
    torch.testing.assert_close(Mish()(x), x * torch.tanh(torch.log1p(torch.exp(x))))
    torch.testing.assert_close(Mish()(x), F.mish(x))
    torch.testing.assert_close(Swish()(x), x * torch.sigmoid(x))
    torch.testing.assert_close(Swish(beta=2.0)(x), x * torch.sigmoid(2 * x))
    torch.testing.assert_close(HardSwish()(x), F.hardswish(x))
    assert HardSwish()(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 3.0]  # the knots
    sw = Swish(learnable=True)
    sw(x).sum().backward()
    assert sw.beta.grad is not None


def test_frn_normalises_per_sample_and_channel_with_tlu_floor() -> None:
    m = FRN(4, eps=1e-10)
    with torch.no_grad():
        m.tau.fill_(-0.2)
    x = torch.randn(3, 4, 6, 6)
    y = m(x)
    # No batch statistics: each sample alone gives the same result; scale-invariant per channel.
    torch.testing.assert_close(m(x[:1]), y[:1])
    scale = torch.tensor([0.1, 2.0, 7.0, 30.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(m(x * scale), y)
    assert (y >= -0.2).all()
    no_tlu = FRN(4, eps=1e-10, tlu=False)
    torch.testing.assert_close(no_tlu(x).pow(2).mean(dim=(2, 3)), torch.ones(3, 4))


# --- DropBlock ---------------------------------------------------------------------------


@pytest.mark.parametrize("p,block", [(0.1, 3), (0.2, 5), (0.1, 4)])
def test_dropblock_rate_close_to_target_in_training(p: float, block: int) -> None:
    m = DropBlock2d(p, block).train()
    x = torch.ones(8, 16, 32, 32)
    y = m(x)
    rate = (y == 0).float().mean().item()
    assert abs(rate - p) < 0.2 * p, rate
    assert abs(y.mean().item() - 1.0) < 1e-4  # kept units rescaled: expectation preserved


def test_dropblock_drops_whole_blocks() -> None:
    torch.manual_seed(3)
    m = DropBlock2d(0.05, 5).train()
    y = m(torch.ones(1, 1, 40, 40))[0, 0]
    dropped = (y == 0).float()
    assert dropped.sum() > 0
    # Every dropped pixel lies in some fully dropped 5x5 square.
    starts = (F.avg_pool2d(dropped[None, None], 5, stride=1) > 0.999).float()  # (36, 36)
    covered = F.max_pool2d(F.pad(starts, (4, 4, 4, 4)), 5, stride=1)[0, 0]  # (40, 40)
    assert (covered >= dropped).all()


def test_dropblock_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(2, 4, 16, 16)
    assert torch.equal(DropBlock2d(0.3, 3).eval()(x), x)
    assert torch.equal(DropBlock2d(0.0, 3).train()(x), x)


def test_modules_compose() -> None:
    # A small neck: backbone levels -> SPPF on the coarsest -> PAN -> CBAM on every level.
    chans = [8, 16, 32]
    xs = _pyramid(2, chans, 32, 32)
    sppf = create_module("sppf", 32)
    pan = create_module("pan", chans, out_channels=16)
    cbam = create_module("cbam", 16, reduction=4)
    ys = [cbam(y) for y in pan([*xs[:2], sppf(xs[2])])]
    assert [y.shape for y in ys] == [(2, 16, 32, 32), (2, 16, 16, 16), (2, 16, 8, 8)]
