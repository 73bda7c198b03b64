"""CPU int8 inference: the same ViT with its Linear layers (qkv, proj, fc1, fc2, head) in int8.

    y = (q(x) @ q(W)^T) * s_x * s_w + b

Weights: symmetric, per output channel, 7 bits, quantised once (`quantize`) and stored as int8
plus one float scale per output channel (the saved format). Activations are quantised at
every call (dynamic: no calibration set) by one of two engines:

- "fbgemm" (default on x86): torch's fused dynamic-quantised linear (the kernel behind
  torch.ao quantize_dynamic), fed our per-channel weights. Activations: 8-bit, one affine
  scale per call (the whole batch, as ONNX Runtime's dynamic int8). The fastest engine measured
  here, level with or ahead of ONNX Runtime int8 (docs/int8.md).
- "int_mm": per-token symmetric activations and `torch._int_mm` (oneDNN's s8s8s32 gemm), then
  a float rescale. Slower here (the quantise/rescale passes are separate ops), but an image's
  result does not depend on the other images of its batch; also the fallback where torch has
  no fbgemm (ARM).

Softmax, LayerNorm, GELU, the patch and position embeddings stay in float: they cost little,
and quantising softmax or LayerNorm naively is what collapses ViT accuracy (FQ-ViT).

Saturation. On x86 CPUs without VNNI both kernels multiply u8 by s8 through vpmaddubsw, which
adds two products into a saturating int16: 255 * 127 * 2 = 64770 overflows 32767. Weights are
therefore held to 7 bits (|q| <= 63, the "reduced range" of ONNX Runtime): 255 * 63 * 2 = 32130
always fits, with 8-bit activations. tests/test_int8.py proves it for both engines with the
kernels capped at AVX2 (ONEDNN_MAX_CPU_ISA, FBGEMM_ENABLE_INSTRUCTIONS) on a case built to
saturate.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .vit import ViT

WEIGHT_BITS = 7  # reduced range: see the module docstring
WEIGHT_QMAX = 2 ** (WEIGHT_BITS - 1) - 1  # 63
ACT_QMAX = 127
QUANTIZATION = "int8-w7-per-channel"  # metadata tag of saved int8 files; bump on any change
ENGINES = ("fbgemm", "int_mm")
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


def default_engine() -> str:
    """fbgemm where torch has it (x86 builds), else int_mm."""
    return "fbgemm" if torch.backends.quantized.engine in ("x86", "fbgemm") else "int_mm"


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and dynamically quantised int8 activations (CPU)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, engine: str = "fbgemm"
    ) -> None:
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.engine = engine
        # Stored (out, in) as nn.Linear so a saved file keeps timm's names and layout.
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: Any = None  # fbgemm's packed weights: derived, never saved

    @classmethod
    def from_float(cls, linear: nn.Linear, engine: str = "fbgemm") -> Int8Linear:
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, engine=engine
        )
        layer.weight, layer.weight_scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def _pack(self) -> Any:
        """fbgemm's packed form of our weights (once; dropped when the weights change)."""
        if self._packed is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch flags its quantized tensors as legacy
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight,
                    self.weight_scale.double(),
                    torch.zeros(self.out_features, dtype=torch.long),
                    0,
                )
                bias = None if self.bias is None else self.bias.float()
                self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # M,K with M = all tokens of the batch
        if x2.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.out_features)
        if self.engine == "fbgemm":
            # reduce_range=False: 8-bit activations are safe because the weights are 7-bit.
            y = torch.ops.quantized.linear_dynamic(x2, self._pack(), False)  # M,N
        else:
            q, scale = quantize_tokens(x2)
            y = torch._int_mm(q, self.weight.t()).float()  # M,N: exact int32 sums, then float
            y.mul_(scale)  # per token
            if self.bias is None:
                y.mul_(self.weight_scale)
            else:  # per channel, and the bias, in one pass
                torch.addcmul(self.bias, y, self.weight_scale, out=y)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._packed = None  # .to(...) may have changed the scales or the bias
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_packed"] = None  # deepcopy and pickle repack on first use
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, engine={self.engine}, weights=int{WEIGHT_BITS} "
            "per channel"
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


def quantize(model: ViT, inplace: bool = False, engine: str | None = None) -> ViT:
    """The same ViT with qkv, proj, fc1, fc2 and head as Int8Linear, in eval mode, CPU only.

    `inplace=True` swaps the layers of `model` itself (no second copy of the weights in memory);
    the float weights of the swapped layers are freed. `engine`: "fbgemm" or "int_mm" (see the
    module docstring); None picks `default_engine()`. Layers already in int8 switch engine.
    """
    _check_cpu(model)
    engine = engine or default_engine()
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    if model.training:
        model.eval()
    if not inplace:
        model = copy.deepcopy(model)
    for name in _quantizable(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, Int8Linear.from_float(linear, engine=engine))
    set_engine(model, engine)
    model.requires_grad_(False)
    return model


def set_engine(model: nn.Module, engine: str) -> None:
    """Switch every Int8Linear of `model` to `engine` ("fbgemm" or "int_mm")."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.engine = engine


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, Int8Linear) for module in model.modules())


def quantized_skeleton(model: ViT, engine: str | None = None) -> ViT:
    """Swap the Linear layers for empty Int8Linear ones: the shape that `load_state_dict` of a
    saved int8 state fills (no quantisation work; the float values are discarded)."""
    for name in _quantizable(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(
            parent,
            child,
            Int8Linear(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                engine=engine or default_engine(),
            ),
        )
    model.eval().requires_grad_(False)
    return model
