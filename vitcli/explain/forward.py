"""The one forward pass every explanation method reads, batched, and what a method needs.

`forward_pass(model, pixels, request)` runs the model once and keeps only what the chosen
methods declare they need (`Method.needs`): the per-head query rows, rollout's
(B, T, T) factors, whole softmax weights of some layers, and, for gradient methods, the
autograd record of that same forward (`Graph`): GAE, Grad-CAM and LRP attribution take their
backward passes from it, one per target, instead of running the model again.

Without a gradient method the pass runs in inference mode and a `QueryTap` drops each layer's
(B, nh, T, T) weights as soon as it has read them. With one, the model is frozen (eval mode,
requires_grad False, both restored), the input is the only leaf, and grad mode is on even
inside a caller's no_grad or inference_mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..errors import InputError
from ..model.vit import Block
from .maps import rollout_seed, seeded_rollout
from .queries import QueryTap, query_names

MapFunction = Callable[["Forward"], torch.Tensor]


def _no_layers(depth: int) -> Iterable[int]:
    return ()


@dataclass(frozen=True)
class Method:
    name: str
    compute: MapFunction  # -> (B, Hp, Wp), any float dtype, on any device
    layers: Callable[[int], Iterable[int]] = _no_layers  # whole weights it reads, given depth
    class_specific: bool = False  # explains forward.targets, one call per target
    needs: frozenset[str] = field(default_factory=frozenset)  # what the forward must keep
    check: Callable[[Any], None] | None = None  # refuses a model it cannot explain
    memory: int = 1  # peak memory per image over rollout's (auto batch size)

    @property
    def rollout(self) -> bool:
        return "rollout" in self.needs


@dataclass(frozen=True)
class Request:
    """What one batch is asked for: methods, their parameters, the per-head maps' layers."""

    methods: tuple[Method, ...] = ()
    head_layers: tuple[int, ...] = ()  # resolved indices of the per-head maps; () for none
    head_fusion: str = "mean"
    discard_ratio: float = 0.0  # rollout: lowest patch keys zeroed per row, in [0, 1)
    layer: int = -1  # raw's layer
    explore: bool = False  # keep every layer's whole weights (the explorer page)


@dataclass
class Graph:
    """The autograd record of the forward, for gradient methods (one backward per target)."""

    logits: torch.Tensor  # (B, K), in the graph
    weights: dict[int, torch.Tensor]  # layer -> (B, nh, T, T) softmax weights, in the graph
    probe: torch.Tensor | None = None  # (B, nh, 1, T) MAP probe weights, in the graph
    activations: torch.Tensor | None = None  # (B, T, D) last block's norm1 output (Grad-CAM)
    block_inputs: list[torch.Tensor] = field(default_factory=list)  # detached (LRP)
    tokens: torch.Tensor | None = None  # (B, T, D) final tokens, detached (LRP)


@dataclass
class Forward:
    """One batch after the shared forward pass: what every method may read."""

    model: Any  # the ViT, in eval mode, on the device
    pixels: torch.Tensor  # (B, C, H, W) normalised model input on the device
    logits: torch.Tensor  # (B, K), detached
    weights: dict[int, torch.Tensor]  # layer -> (B, nh, T, T), detached: the layers kept whole
    grid_size: tuple[int, int]  # (Hp, Wp) of this input
    prefix: int  # tokens before the patches (CLS, registers, ...)
    request: Request
    targets: torch.Tensor  # (B,) class a class-specific map explains (the top-1 until set)
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, nh, Q, T)
    probe: torch.Tensor | None = None  # (B, nh, 1, T) MAP probe weights, detached
    # (B, T) seed^T Ã_L ... Ã_1 over all tokens when a method reads rollout; the seed is the
    # class query (e_0, the MAP probe's row, or the mean row without either)
    rollout_row: torch.Tensor | None = None
    graph: Graph | None = None


@contextmanager
def frozen(model: Any) -> Iterator[None]:
    """Eval mode and requires_grad False on every parameter for the block; both restored."""
    was_training = model.training
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


def require_head(model: Any) -> None:
    if not getattr(model.config, "num_classes", 1):
        raise InputError(
            "gae, attribution and gradcam explain a class, and this model has no classifier "
            "head: use --method raw or rollout"
        )


def _explicit(module: Any, args: Any, kwargs: dict) -> tuple[Any, dict]:
    return args, {**kwargs, "return_weights": True}


def kept_layers(request: Request, depth: int) -> list[int]:
    """The layers whose whole (B, nh, T, T) weights the forward keeps: those a method reads
    (all of them in the autograd graph for a "graph" method) and, with `explore`, every layer.
    Per-head maps keep only their query rows and rollout only its (B, T, T) factors (a DINOv2
    grid at 518 has 1370 tokens: all weights of all layers would be gigabytes per image)."""
    if request.explore:
        return list(range(depth))
    keep: set[int] = set()
    for method in request.methods:
        keep.update(index % depth for index in method.layers(depth))
        if "layer" in method.needs:
            keep.add(request.layer % depth)
        if "graph" in method.needs:
            keep.update(range(depth))
    return sorted(keep)


def forward_pass(model: Any, pixels: torch.Tensor, request: Request) -> Forward:
    """Run `model` once on `pixels` (B, C, H, W) and keep what `request`'s methods need."""
    config = model.config
    depth, prefix = config.depth, model.num_prefix_tokens
    grid_size = (pixels.shape[-2] // config.patch_size, pixels.shape[-1] // config.patch_size)
    needs: set[str] = set()
    for method in request.methods:
        if method.class_specific:
            require_head(model)
        if method.check is not None:
            method.check(model)
        needs |= method.needs
    graph_mode = bool(needs & {"graph", "activations", "relevance"})
    keep = set(kept_layers(request, depth))
    names = query_names(config)
    tap = QueryTap(
        row_layers=set(request.head_layers),
        query_rows=None if names == ("mean",) else tuple(range(len(names))),
        rollout=(request.head_fusion, request.discard_ratio) if "rollout" in needs else None,
        depth=depth,
        keep=keep,
        prefix=prefix,
    )
    captured: dict[str, list[torch.Tensor]] = {"probe": [], "norm1": [], "inputs": []}
    with ExitStack() as stack:
        if graph_mode:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(frozen(model))
            stack.enter_context(torch.enable_grad())
            # A copy: the caller's tensor may be an inference tensor, which autograd cannot save.
            x = pixels.detach().clone().requires_grad_(True)
        else:
            stack.enter_context(torch.inference_mode())
            x = pixels
        handles = tap.attach(model)
        attn_pool = getattr(model, "attn_pool", None)
        if graph_mode and attn_pool is not None:  # SigLIP: the probe the logits read, in the graph
            handles += [
                attn_pool.register_forward_pre_hook(_explicit, with_kwargs=True),
                attn_pool.register_forward_hook(lambda m, a, out: captured["probe"].append(out[1])),
            ]
        if "activations" in needs:
            norm1 = cast(Block, model.blocks[-1]).norm1
            handles.append(
                norm1.register_forward_hook(lambda m, a, out: captured["norm1"].append(out))
            )
        if "relevance" in needs:
            handles += [
                block.register_forward_pre_hook(
                    lambda m, args: captured["inputs"].append(args[0].detach())
                )
                for block in model.blocks
            ]
        try:
            tokens, weights = model.forward_features(x, attn_layers=sorted(keep))
            logits = model.forward_head(tokens)
        finally:
            for handle in handles:
                handle.remove()
        if captured["probe"]:
            probe = captured["probe"][-1]
        elif attn_pool is not None:  # the probe's class map, (B, nh, 1, T)
            probe = model.map_attention(tokens)
        else:
            probe = None
        graph = None
        if graph_mode:
            graph = Graph(
                logits=logits,
                weights=weights,
                probe=probe,
                activations=captured["norm1"][-1] if captured["norm1"] else None,
                block_inputs=captured["inputs"],
                tokens=tokens.detach(),
            )
        with torch.no_grad():
            weights = {layer: w.detach() for layer, w in weights.items()}
            probe = probe.detach() if probe is not None else None
            for layer, layer_weights in weights.items():
                if layer in tap.row_layers or (tap.rollout and layer not in tap.factors):
                    tap.consume(layer, layer_weights)
            rollout_row = None
            if "rollout" in needs:
                batch, count = tokens.shape[0], tokens.shape[1]
                seed = rollout_seed(config, probe, batch, count, tokens.device)
                rollout_row = seeded_rollout([tap.factors[i] for i in range(depth)], seed)  # B,T
            detached = logits.detach()
    return Forward(
        model=model,
        pixels=pixels,
        logits=detached,
        weights={layer: w for layer, w in weights.items() if layer in keep},
        grid_size=grid_size,
        prefix=prefix,
        request=request,
        targets=detached.argmax(dim=-1),
        rows=tap.rows,
        probe=probe,
        rollout_row=rollout_row,
        graph=graph,
    )
