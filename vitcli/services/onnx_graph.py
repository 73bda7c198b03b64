"""The ONNX graph of a ViT, as `vit export` and the onnxruntime int8 engine both build it:
checks that a model can be exported, the trace (TorchScript exporter, dynamic batch axis, fixed
image size), ORT dynamic int8 on the Linear layers, and the metadata the graph carries."""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..errors import InputError, OptionError, VitError
from ..model import ViT
from ..model.int8 import is_quantized
from ..runtime import MAX_IMAGE_SIDE
from ..weights.format import ModelBundle

INSTALL_HINT = "pip install 'vitcli[onnx]'"
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on
MIN_OPSET = 14  # scaled_dot_product_attention needs 14
MAX_OPSET = 20  # the TorchScript exporter's ceiling
PROTOBUF_LIMIT = 2**31 - 2**24  # one .onnx file holds < 2 GiB (protobuf); keep a margin
INPUT_NAME = "pixel_values"


class ExportError(VitError):
    """A model that cannot be exported, or an export that does not match our forward."""


def require_onnx() -> None:
    """Raise a one-line ExportError when the onnx package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None


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
