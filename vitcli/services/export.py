"""ONNX export: the model, its preprocessing and labels in one .onnx file, checked before it lands.

The graph is traced by torch's TorchScript exporter (`dynamo=False`: it needs no onnxscript),
with a dynamic batch axis and a fixed image size. `int8=True` then applies ONNX Runtime's
dynamic quantisation to the Linear layers only (per-channel weights, reduced range, as
vitcli.model.int8): the attention products, softmax, LayerNorm, GELU and the patch embedding
stay float. With onnxruntime installed the result is run against our own forward before the
file is written (fp32: max abs diff over 1e-4 is an error); the write is atomic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import OptionError
from ..fileio import atomic_write_bytes, output_errors
from ..model import ViT
from ..model.int8 import QUANTIZED_LAYERS
from ..weights.format import ModelBundle
from ..weights.resolve import as_bundle
from .onnx_graph import (
    DEFAULT_OPSET,
    INPUT_NAME,
    INSTALL_HINT,
    ExportError,
    build_graph,
    check_exportable,
    graph_metadata,
    require_onnx,
    sample_input,
    sized_model,
)

MAX_TRACE_BYTES = 8 * 2**30  # attention matrices of the check forward (check_trace_memory)
FP32_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    path: Path
    model_name: str  # the architecture's name (e.g. B/16), or "custom"
    opset: int
    int8: bool
    image_size: tuple[int, int]
    outputs: list[str]
    size_bytes: int
    verified: bool  # onnxruntime ran the file against our forward
    max_abs_diff: float | None = None  # logits vs our fp32 forward
    attention_max_abs_diff: float | None = None
    top1_agreement: float | None = None  # int8: argmax agreement with our fp32 forward
    notes: list[str] = field(default_factory=list)


def has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class _Exported(nn.Module):
    """pixel_values -> logits (or features), then the softmax weights of the chosen layers."""

    def __init__(self, model: ViT, layers: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            if not self.layers:
                return (self.model(pixel_values),)
            logits, weights = self.model.forward_with_attention(pixel_values, self.layers)
        return (logits, *(weights[layer] for layer in self.layers))


def _verify(
    result: ExportResult, graph_bytes: bytes, module: _Exported, example: torch.Tensor
) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(graph_bytes, options, providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: example.numpy()})
    with torch.inference_mode():
        want = module(example)
    diffs = [float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want)]
    result.verified = True
    result.max_abs_diff = diffs[0]
    if len(diffs) > 1:
        result.attention_max_abs_diff = max(diffs[1:])
    if want[0].ndim == 2 and want[0].shape[1] > 1:
        agree = torch.from_numpy(got[0]).argmax(1) == want[0].argmax(1)
        result.top1_agreement = float(agree.float().mean())
    if not result.int8 and max(diffs) > FP32_TOLERANCE:
        raise ExportError(
            f"the exported graph differs from vitcli's forward by {max(diffs):.2e} "
            f"(over {FP32_TOLERANCE:g}); nothing was written. Please report this model"
        )


def check_trace_memory(config, image_size: tuple[int, int], count: int) -> None:
    """Refuse an export whose check forward would hold attention matrices over
    MAX_TRACE_BYTES (count x heads x T x T floats): --image-size 4096 on a /16 model is
    65,537 tokens, ~200 GB, which must fail in one line rather than in the kernel's OOM
    killer."""
    grid = (image_size[0] // config.patch_size) * (image_size[1] // config.patch_size)
    tokens = grid + config.num_prefix_tokens
    needed = count * config.num_heads * tokens * tokens * 4
    if needed > MAX_TRACE_BYTES:
        raise OptionError(
            f"--image-size {image_size[0]}x{image_size[1]}: {tokens:,} tokens; checking the "
            f"export needs {needed / 2**30:,.1f} GiB of attention matrices, over the "
            f"{MAX_TRACE_BYTES / 2**30:.0f} GiB limit; use a smaller --image-size"
        )


def export_onnx(
    model_ref: ModelBundle | str | Path | None,
    path: str | Path,
    *,
    int8: bool = False,
    image_size: tuple[int, int] | None = None,
    opset: int | None = None,
    attention_layers: Sequence[int] = (),
    verify: bool = True,
    verify_batch: int = 0,
    on_stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export `bundle` to `path` (.onnx), checked with onnxruntime when it is installed."""
    bundle = as_bundle(model_ref)
    require_onnx()
    stage = on_stage or (lambda _message: None)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    size = tuple(image_size) if image_size is not None else bundle.preprocess.size
    image_size = (int(size[0]), int(size[1]))
    layers = check_exportable(bundle, image_size, opset, attention_layers)
    if int8 and not has_onnxruntime():
        raise ExportError(f"--int8 export needs onnxruntime: {INSTALL_HINT}")
    path = Path(path)

    model = original = bundle.model
    was_training = original.training
    original.eval()
    try:
        head = "logits" if bundle.config.num_classes > 0 else "features"
        outputs = [head, *(f"attention_{layer}" for layer in layers)]
        module = _Exported(sized_model(model, image_size), layers).eval()
        count = verify_batch if verify_batch else (16 if int8 else 2)
        check_trace_memory(bundle.config, image_size, count)
        example = sample_input(bundle, image_size, count)
        graph_bytes = build_graph(
            module,
            example,
            outputs,
            opset=opset,
            int8=int8,
            metadata=graph_metadata(bundle, image_size, outputs, int8),
            on_stage=stage,
        )
        result = ExportResult(
            path=path,
            model_name=bundle.config.name or "custom",
            opset=opset,
            int8=int8,
            image_size=image_size,
            outputs=outputs,
            size_bytes=len(graph_bytes),
            verified=False,
        )
        if verify and has_onnxruntime():
            stage("checking the graph against vitcli's forward (onnxruntime)")
            _verify(result, graph_bytes, module, example)
        elif verify:
            result.notes.append(f"not verified: onnxruntime is not installed ({INSTALL_HINT})")
    finally:
        original.train(was_training)
    with output_errors(str(path)):
        atomic_write_bytes(path, graph_bytes)
    return result


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an .onnx file (what `export_onnx` stored)."""
    require_onnx()
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in graph.metadata_props}


__all__ = [
    "INSTALL_HINT",
    "QUANTIZED_LAYERS",
    "ExportError",
    "ExportResult",
    "export_onnx",
    "has_onnxruntime",
    "read_metadata",
    "require_onnx",
]
