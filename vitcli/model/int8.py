"""CPU int8 inference: the same ViT with its Linear layers (qkv, proj, fc1, fc2, head) in int8.

    y = (round(x / s_x) @ round(W / s_w)^T) * s_x * s_w + b

Weights: symmetric, per output channel, quantised once (`quantize`). Activations: symmetric,
per token, quantised at every call from the token's own max |x| (dynamic: no calibration set).
The int8 x int8 -> int32 product runs in `torch._int_mm` (oneDNN's s8s8s32 gemm), which was the
fastest engine measured here (docs/int8.md). Softmax, LayerNorm, GELU, the patch embedding and
the position embedding stay in float: they cost little time, and quantising softmax or
LayerNorm naively is what collapses ViT accuracy (FQ-ViT).

Saturation. On x86 CPUs without VNNI, oneDNN computes s8 x s8 as (x + 128) u8 times s8 through
vpmaddubsw, which adds two u8*s8 products into a saturating int16: 255 * 127 * 2 = 64770
overflows 32767. Weights are therefore held to 7 bits (|q| <= 63, the "reduced range" of
fbgemm and ONNX Runtime): 255 * 63 * 2 = 32130 always fits. tests/test_int8.py proves it with
oneDNN capped at AVX2 on inputs built to saturate.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import InputError
from .vit import ViT

WEIGHT_BITS = 7  # reduced range: see the module docstring
WEIGHT_QMAX = 2 ** (WEIGHT_BITS - 1) - 1  # 63
ACT_QMAX = 127
QUANTIZATION = "int8-dynamic-w7a8"  # the metadata tag of saved int8 files; bump on any change
# Linear layers by their name inside a ViT; everything else stays float.
QUANTIZED_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "head")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) with q int8 in [-63, 63] and weight ~= q * scale[:, None], per output row."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / WEIGHT_QMAX  # (out,)
    q = torch.round(weight / scale[:, None]).clamp_(-WEIGHT_QMAX, WEIGHT_QMAX)
    return q.to(torch.int8), scale


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) for a (M, K) float tensor: int8 per row (token), x ~= q * scale."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(ACT_QMAX)  # M,1
    # |x / scale| <= 127 by construction, so no clamp is needed before the cast.
    return torch.round(x / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and dynamically quantised int8 activations (CPU)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Stored (out, in) as nn.Linear so a saved file keeps timm's names and layout.
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight, layer.weight_scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # M,K with M = all tokens of the batch
        if x2.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.out_features)
        q, scale = quantize_tokens(x2)
        y = torch._int_mm(q, self.weight.t()).float()  # M,N: exact int32 sums, then float
        y.mul_(scale)  # per token
        if self.bias is None:
            y.mul_(self.weight_scale)
        else:  # per channel, and the bias, in one pass
            torch.addcmul(self.bias, y, self.weight_scale, out=y)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weights=int{WEIGHT_BITS} per channel, "
            "activations=int8 per token"
        )


def _check_cpu(model: nn.Module) -> None:
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices - {"cpu"}:
        raise InputError(
            f"int8 runs on the CPU only (the model is on {', '.join(sorted(devices))}); "
            "drop --int8 or use --device cpu"
        )


def _quantizable(model: ViT) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(QUANTIZED_LAYERS)
    ]


def quantize(model: ViT, inplace: bool = False) -> ViT:
    """The same ViT with qkv, proj, fc1, fc2 and head as Int8Linear, in eval mode, CPU only.

    `inplace=True` swaps the layers of `model` itself (no second copy of the weights in memory);
    the float weights of the swapped layers are freed. Already quantised layers are left alone.
    """
    _check_cpu(model)
    if model.training:
        model.eval()
    if not inplace:
        model = copy.deepcopy(model)
    for name in _quantizable(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, Int8Linear.from_float(linear))
    model.requires_grad_(False)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, Int8Linear) for module in model.modules())


def quantized_skeleton(model: ViT) -> ViT:
    """Swap the Linear layers for empty Int8Linear ones: the shape that `load_state_dict` of a
    saved int8 state fills (no quantisation work; the float values are discarded)."""
    for name in _quantizable(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(
            parent,
            child,
            Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None),
        )
    model.eval().requires_grad_(False)
    return model
