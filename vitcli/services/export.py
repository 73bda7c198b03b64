"""ONNX export: the model, its preprocessing and labels in one .onnx file, checked before it lands.

The graph is traced by torch's TorchScript exporter (`dynamo=False`: it needs no onnxscript),
with a dynamic batch axis and a fixed image size. `int8=True` then applies ONNX Runtime's
dynamic quantisation to the Linear layers only (per-channel weights, reduced range, as
vitcli.model.int8): the attention products, softmax, LayerNorm, GELU and the patch embedding
stay float. With onnxruntime installed the result is run against our own forward before the
file is written (fp32: max abs diff over 1e-4 is an error); the write is atomic.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..errors import InputError, OptionError, VitError
from ..fileio import atomic_write_bytes, output_errors
from ..model import ViT
from ..model.int8 import QUANTIZED_LAYERS, is_quantized
from ..runtime import MAX_IMAGE_SIDE
from ..weights.format import ModelBundle
from ..weights.resolve import as_bundle

INSTALL_HINT = "pip install 'vitcli[onnx]'"
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on
MAX_TRACE_BYTES = 8 * 2**30  # attention matrices of the check forward (check_trace_memory)
MIN_OPSET = 14  # scaled_dot_product_attention needs 14
MAX_OPSET = 20  # the TorchScript exporter's ceiling
FP32_TOLERANCE = 1e-4
PROTOBUF_LIMIT = 2**31 - 2**24  # one .onnx file holds < 2 GiB (protobuf); keep a margin
INPUT_NAME = "pixel_values"


class ExportError(VitError):
    """A model that cannot be exported, or an export that does not match our forward."""


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


def require_onnx() -> None:
    """Raise a one-line ExportError when the onnx package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None


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


def check_exportable(
    bundle: ModelBundle, image_size: tuple[int, int], opset: int, layers: Sequence[int]
) -> list[int]:
    model, config = bundle.model, bundle.config
    if is_quantized(model):
        raise ExportError(
            "this model is already vitcli int8, which ONNX cannot express; export the float "
            "model and add --int8"
        )
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise InputError("export traces the model on the CPU: move it there first (.cpu())")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OptionError(f"--opset {opset} is not supported: use {MIN_OPSET} to {MAX_OPSET}")
    height, width = image_size
    if max(height, width) > MAX_IMAGE_SIDE:
        raise OptionError(
            f"--image-size {height}x{width}: each side must be from 1 to {MAX_IMAGE_SIDE} pixels"
        )
    if (
        min(height, width) < config.patch_size
        or height % config.patch_size
        or (width % config.patch_size)
    ):
        raise OptionError(
            f"--image-size {height}x{width} is not a positive multiple of the patch size "
            f"{config.patch_size}"
        )
    size = sum(t.numel() * 4 for t in model.state_dict().values())
    if size > PROTOBUF_LIMIT:
        raise ExportError(
            f"the model's fp32 weights take {size / 2**30:.1f} GiB, over the 2 GiB a single .onnx "
            "file can hold; use a smaller model"
        )
    depth = config.depth
    chosen: list[int] = []
    for layer in layers:
        if not -depth <= layer < depth:
            raise OptionError(
                f"--attention-layer {layer} is out of range for a model with {depth} layers "
                f"(use 0..{depth - 1}, or -1 for the last)"
            )
        if layer % depth not in chosen:
            chosen.append(layer % depth)
    return chosen


def _trace(module: nn.Module, example: torch.Tensor, outputs: list[str], opset: int) -> bytes:
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}
    with warnings.catch_warnings():
        # The legacy exporter warns that it is legacy, and the tracer about Python-level
        # branches on shapes (the image size is fixed by design).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter takes a file object
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def _quantize_linear_layers(graph_bytes: bytes) -> bytes:
    """ORT dynamic int8 on the MatMul/Gemm nodes that multiply by a weight (initializer)."""
    import logging
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load_from_string(graph_bytes)
    weights = {init.name for init in graph.graph.initializer}
    # Activation x activation products (q k^T, weights v) stay float, as in vitcli.model.int8.
    linear = [
        node.name
        for node in graph.graph.node
        if node.op_type in ("MatMul", "Gemm") and any(name in weights for name in node.input[1:2])
    ]
    # The quantiser logs a root-level hint about ORT's optional pre-processing step, which
    # does not apply to a graph that the exporter has just constant-folded.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="vitcli-onnx-") as tmp:
            source, target = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
            source.write_bytes(graph_bytes)
            quantize_dynamic(
                source,
                target,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=True,  # 7-bit weights: no int16 saturation on CPUs without VNNI
                nodes_to_quantize=linear,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
            return target.read_bytes()
    finally:
        root.setLevel(level)


def graph_metadata(
    bundle: ModelBundle, image_size: tuple[int, int], outputs: list[str], int8: bool
) -> dict[str, str]:
    preprocess = bundle.preprocess.with_size(image_size)
    return {
        "vitcli_version": __version__,
        "config": bundle.config.replace(image_size=image_size).to_json(),
        "labels": json.dumps(bundle.labels, ensure_ascii=False),
        "preprocess": preprocess.to_json(),
        "input": (
            f"{INPUT_NAME}: float32 (batch, 3, {image_size[0]}, {image_size[1]}), RGB, "
            "resized and cropped as 'preprocess' says, then (pixel / 255 - mean) / std"
        ),
        "outputs": json.dumps(outputs),
        "quantization": "onnxruntime-dynamic-int8-per-channel-reduce-range" if int8 else "none",
        "source": bundle.reference or bundle.source_format,
    }


def sample_input(bundle: ModelBundle, image_size: tuple[int, int], count: int) -> torch.Tensor:
    """Images of uniform noise, normalised as the model expects (deterministic)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(count, 3, *image_size, generator=generator)
    mean = torch.tensor(bundle.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.preprocess.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


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


def sized_model(model: ViT, image_size: tuple[int, int]) -> ViT:
    """`model`, or a copy set to `image_size` for good when that differs from its own: the
    position table is resampled here, once, by the same function a forward at that size uses,
    and the graph holds the result (the resampling, antialiased bicubic, has no ONNX operator)."""
    if tuple(image_size) == tuple(model.config.image_size):
        return model
    model = copy.deepcopy(model)
    model.set_image_size(image_size)
    return model


def build_graph(
    module: nn.Module,
    example: torch.Tensor,
    outputs: list[str],
    *,
    opset: int,
    int8: bool,
    metadata: dict[str, str],
    on_stage: Callable[[str], None] | None = None,
) -> bytes:
    """The serialized graph of `module` (pixel_values -> `outputs`, dynamic batch): traced on
    `example[:1]`, its Linear layers quantised when `int8`, `metadata` in metadata_props.
    Shared by `export_onnx` and the onnxruntime int8 engine (services/ort_engine.py)."""
    import onnx

    stage = on_stage or (lambda _message: None)
    stage("tracing the model")
    graph_bytes = _trace(module, example[:1], outputs, opset)
    if int8:
        stage("quantising the Linear layers (onnxruntime dynamic int8)")
        graph_bytes = _quantize_linear_layers(graph_bytes)
    graph = onnx.load_from_string(graph_bytes)
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    graph.producer_name, graph.producer_version = "vitcli", __version__
    return graph.SerializeToString()


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
