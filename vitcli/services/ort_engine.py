"""The onnxruntime engine behind `--int8`: the model exported and quantised as `vit export
--int8` does it (ORT dynamic int8 on the Linear layers), run by an ONNX Runtime session that
predict, embed and eval call like the model (docs/int8.md, "Engines behind --int8").

Why a second engine: torch's fbgemm int8 (vitcli.model.int8) reaches ~3x our fp32, but ORT's
dynamic int8 is faster still on the same int8 products, because it runs the float parts
(attention, GELU, LayerNorm) as fused kernels out of an arena. The graph has three named
outputs, so one session serves every command: `logits` (what `forward` gives: the head's
output, or the features of a model without classes), `embedding` (`ViT.embed`) and `tokens`
(`forward_features`, after the final LN).

Exporting and quantising a B/16 takes seconds, so the int8 graph is cached on disk, keyed by
a hash of everything it depends on (the weights, config, image size, opset and the versions
of vitcli, torch, onnx and onnxruntime), under $VITCLI_CACHE, else $XDG_CACHE_HOME/vitcli,
else ~/.cache/vitcli. An entry that does not load is rebuilt; a cache folder that cannot be
written leaves the graph in memory only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..fileio import atomic_write_bytes
from ..model import ViT, ViTConfig
from ..weights.format import ModelBundle
from .onnx_graph import (
    DEFAULT_OPSET,
    INPUT_NAME,
    build_graph,
    check_exportable,
    graph_metadata,
    sample_input,
    sized_model,
)

OUTPUTS = ["logits", "embedding", "tokens"]
CACHE_ENV = "VITCLI_CACHE"
CACHE_SUBDIR = "int8-onnx"
KEY_FIELD = "vitcli_cache_key"  # metadata entry: the key a cached graph was built for
GRAPH_FORMAT = "1"  # bump when the graph this module builds changes


class _EngineOutputs(nn.Module):
    """pixel_values -> (logits, embedding, tokens): one encoder pass, three named outputs."""

    def __init__(self, model: ViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        with torch.no_grad():
            tokens, _ = model.forward_features(pixel_values)  # B,T,D
            logits = model.forward_head(tokens)
            # ViT.embed on the same tokens (calling it would trace the encoder twice).
            embedding = model.project(model.pool(tokens))
            # The exporter cannot name one tensor twice (a model without classes has an
            # Identity head): the + 0 makes the embedding a tensor of its own.
            return logits, embedding + 0, tokens


def cache_dir() -> Path:
    """$VITCLI_CACHE, else $XDG_CACHE_HOME/vitcli, else ~/.cache/vitcli."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "vitcli"


def cache_key(bundle: ModelBundle, image_size: tuple[int, int], opset: int) -> str:
    """sha256 of everything the int8 graph depends on: the weights (by their source's stamp
    while the model still holds the tensors read from it, else by their bytes), the config,
    the image size, the opset and the versions."""
    import onnxruntime

    digest = hashlib.sha256()
    # onnx's version from its metadata: importing onnx takes ~1 s, which a warm start (the
    # graph in the cache, onnx never needed) would otherwise pay for one string.
    versions = (__version__, torch.__version__, _version_of("onnx"), onnxruntime.__version__)
    for part in (GRAPH_FORMAT, *versions, bundle.config.to_json(), str(image_size), str(opset)):
        digest.update(part.encode())
        digest.update(b"\0")
    if bundle.stamp is not None and bundle.stamp.matches(bundle.model):
        digest.update(f"source:{bundle.stamp.files}".encode())
        return digest.hexdigest()
    for name, tensor in bundle.model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())  # no copy of the weights
    return digest.hexdigest()


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"


def _graph(bundle: ModelBundle, image_size: tuple[int, int], opset: int, key: str) -> bytes:
    model = bundle.model
    was_training = model.training
    model.eval()
    try:
        module = _EngineOutputs(sized_model(model, image_size)).eval()
        metadata = graph_metadata(bundle, image_size, OUTPUTS, int8=True)
        metadata[KEY_FIELD] = key
        return build_graph(
            module,
            sample_input(bundle, image_size, 1),
            OUTPUTS,
            opset=opset,
            int8=True,
            metadata=metadata,
        )
    finally:
        model.train(was_training)


def session_options() -> Any:
    """intra-op threads as torch's (the user's --threads, OMP_NUM_THREADS, ...), one op at a
    time, every graph optimisation; no spinning where the command asked OpenMP not to spin
    (runtime.prefer_passive_waiting: decoders share the cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _session(graph: bytes | str, key: str) -> Any:
    """An ORT session of `graph` (bytes or a path); ValueError when it is not the graph for
    `key` with our outputs (a corrupt, foreign or stale cache entry)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidProtobuf/... classes
        raise ValueError(f"onnxruntime cannot load the graph: {error}") from None
    meta = session.get_modelmeta().custom_metadata_map
    names = [output.name for output in session.get_outputs()]
    if meta.get(KEY_FIELD) != key or names != OUTPUTS:
        raise ValueError("the graph is not the one this model needs")
    return session


def ort_session(
    bundle: ModelBundle,
    image_size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    on_build: Callable[[Path | None], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Any:
    """An ORT int8 session of `bundle`'s float model at `image_size` (default: its
    preprocessing's), from the cache or built (and cached) now. `on_build(path)` is called
    when a graph is built: path None when it could not be cached; `on_note(message)` before a
    build (it takes seconds for a large model), for the user."""
    size = tuple(image_size) if image_size is not None else bundle.preprocess.size
    image_size = (int(size[0]), int(size[1]))
    check_exportable(bundle, image_size, opset, ())
    key = cache_key(bundle, image_size, opset)
    path = cache_dir() / CACHE_SUBDIR / f"{key}.onnx"
    if path.is_file():
        try:
            return _session(str(path), key)
        except ValueError:
            pass  # rebuilt below, and written over
    if on_note is not None:
        on_note(
            "--int8: building this model's onnxruntime int8 graph (once per model and size; "
            f"cached in {path.parent})"
        )
    graph = _graph(bundle, image_size, opset, key)
    stored: Path | None = path
    try:
        atomic_write_bytes(path, graph, durable=False)  # a lost entry is only rebuilt
    except OSError:
        stored = None  # a read-only or full cache: the session still runs from memory
    if on_build is not None:
        on_build(stored)
    return _session(graph, key)


class OrtInt8ViT(nn.Module):
    """The ORT int8 session standing in for a float ViT where predict, embed and eval use it:
    `forward` (logits), `embed`, `forward_features` (tokens; no attention weights), `config`,
    and the float `head`/`fc_norm` modules embed reads. Input: (B, 3, H, W) float32 on the CPU
    at the size the graph was built for; any batch size."""

    int8_engine = "onnxruntime"  # services/int8.py reads it

    def __init__(
        self,
        session: Any,
        config: ViTConfig,
        image_size: tuple[int, int],
        head: nn.Module,
        fc_norm: nn.Module | None,
    ) -> None:
        super().__init__()
        self.session = session
        self.config = config
        self.image_size = image_size
        # The float modules embed's own pooling reads (--pool cls/mean, the dimension): small.
        self.head = head
        self.fc_norm = fc_norm

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, **kwargs: Any) -> OrtInt8ViT:
        """The engine for `bundle`'s float model; `kwargs` go to `ort_session`."""
        session = ort_session(bundle, **kwargs)
        shape = session.get_inputs()[0].shape  # ["batch", 3, H, W]
        model = bundle.model
        size = (int(shape[2]), int(shape[3]))
        return cls(session, bundle.config, size, head=model.head, fc_norm=model.fc_norm)

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (3, *self.image_size):
            raise ValueError(
                f"the onnxruntime int8 engine was built for (B, 3, {self.image_size[0]}, "
                f"{self.image_size[1]}) input, got {tuple(x.shape)}"
            )
        pixels = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        (out,) = self.session.run([name], {INPUT_NAME: pixels})
        return torch.from_numpy(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("logits", x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("embedding", x)

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def pool(self, tokens: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """The float model's read-out of the engine's tokens (`ViT.pool`, for --pool)."""
        return ViT.pool(self, tokens, how)  # type: ignore[arg-type]  # reads config, fc_norm

    def forward_features(
        self, x: torch.Tensor, attn_layers: Collection[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        if attn_layers:
            raise ValueError("the onnxruntime int8 engine returns no attention weights")
        return self._run("tokens", x), {}


__all__ = ["OUTPUTS", "OrtInt8ViT", "cache_dir", "cache_key", "ort_session", "session_options"]
