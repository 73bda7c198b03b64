"""Explanation methods: batched maps equal plain one-image references, and a model whose
answer is known by construction (class 0 reads only patch A, class 1 only patch B)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from vitcli.errors import InputError, OptionError
from vitcli.explain import (
    METHODS,
    explain,
    parse_methods,
    parse_target,
    resolve_targets,
)
from vitcli.model import ViT, ViTConfig

TOLERANCE = 1e-5


def random_model(seed=0, **overrides) -> ViT:
    """Tiny random ViT on a non-square grid (24x40 input, patch 8: 3x5), weights N(0, 0.2)."""
    fields = dict(
        image_size=(24, 40),
        patch_size=8,
        num_classes=4,
        width=16,
        depth=3,
        num_heads=2,
        mlp_dim=24,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = ViT(ViTConfig(**fields)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def images(seed=1, batch=3, size=(24, 40)) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def close(batched: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal within TOLERANCE relative to the reference map's largest value."""
    reference = reference.detach()
    scale = max(float(reference.abs().max()), 1e-12)
    difference = float((batched.double() - reference.double()).abs().max()) / scale
    assert difference <= TOLERANCE, difference


# -- plain references: one image, loops, the paper's formulas as written ---------------------
def prefix(model: ViT) -> int:
    return getattr(model, "num_prefix_tokens", model.config.num_prefix_tokens)


def one_image_attention(model: ViT, image: torch.Tensor):
    """Logits (K,) and every layer's (1, nh, T, T) weights, grads enabled through the input."""
    x = image[None].clone().requires_grad_(True)
    logits, weights = model.forward_with_attention(x, layers=range(model.config.depth))
    return logits[0], [weights[i] for i in range(model.config.depth)]


def grid(model: ViT, image: torch.Tensor) -> tuple[int, int]:
    return image.shape[1] // model.config.patch_size, image.shape[2] // model.config.patch_size


def to_grid(row: torch.Tensor, model: ViT, image: torch.Tensor) -> torch.Tensor:
    grid_h, grid_w = grid(model, image)
    out = torch.zeros(grid_h, grid_w, dtype=torch.float64)
    for r in range(grid_h):
        for c in range(grid_w):
            out[r, c] = row[prefix(model) + r * grid_w + c]
    return out


def start_row(model: ViT, tokens: int) -> torch.Tensor:
    row = torch.zeros(tokens, dtype=torch.float64)
    if model.config.pool == "cls":
        row[0] = 1.0
    else:
        row[prefix(model) :] = 1.0 / (tokens - prefix(model))
    return row


def reference_raw(model, image, layer):
    with torch.no_grad():
        _, weights = one_image_attention(model, image)
    attention = weights[layer][0].double()
    num_heads, tokens, _ = attention.shape
    row = torch.zeros(tokens, dtype=torch.float64)
    for h in range(num_heads):
        row += attention[h, 0] / num_heads
    return to_grid(row, model, image)


def reference_rollout(model, image):
    with torch.no_grad():
        _, weights = one_image_attention(model, image)
    tokens = weights[0].shape[-1]
    result = torch.eye(tokens, dtype=torch.float64)
    for attention in weights:
        fused = attention[0].double().mean(dim=0) + torch.eye(tokens, dtype=torch.float64)
        for r in range(tokens):
            fused[r] = fused[r] / fused[r].sum()
        result = fused @ result
    return to_grid(result[0], model, image)


def reference_gae(model, image, target):
    """Chefer et al. 2021 (ICCV), eq. 5-6, with the full T x T matrix R."""
    logits, weights = one_image_attention(model, image)
    grads = [g[0] for g in torch.autograd.grad(logits[target], weights)]
    weights = [w[0] for w in weights]
    tokens = weights[0].shape[-1]
    relevance = torch.eye(tokens, dtype=torch.float64)
    for attention, grad in zip(weights, grads):  # layer 1 first
        bar = torch.zeros(tokens, tokens, dtype=torch.float64)
        for h in range(attention.shape[0]):
            bar += (grad[h] * attention[h]).double().clamp(min=0) / attention.shape[0]
        relevance = relevance + bar @ relevance
    return to_grid(start_row(model, tokens) @ relevance, model, image)


def reference_gradcam(model, image, target):
    """pytorch-grad-cam for ViT: reshape the last block's norm1 patch tokens to (D, Hp, Wp)."""
    captured = []
    handle = model.blocks[-1].norm1.register_forward_hook(lambda m, a, out: captured.append(out))
    x = image[None].clone().requires_grad_(True)
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits[0, target], captured[0])
    grid_h, grid_w = grid(model, image)
    acts = captured[0][0, prefix(model) :].detach().double().T.reshape(-1, grid_h, grid_w)
    grads = grad[0, prefix(model) :].double().T.reshape(-1, grid_h, grid_w)  # D,Hp,Wp
    cam = torch.zeros(grid_h, grid_w, dtype=torch.float64)
    for channel in range(acts.shape[0]):
        cam += grads[channel].mean() * acts[channel]
    return cam.clamp(min=0)


def reference_attribution(model, image, target):
    """Chefer et al. 2021 (CVPR), following the authors' RelProp classes: every rule as
    x * autograd.grad(Z(x), x, R / Z), one image, relevance sums over the whole tensor."""

    def safe_divide(a, b):  # the authors' stabiliser
        den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
        den = den + den.eq(0).type(den.type()) * 1e-9
        return a / den * b.ne(0).type(b.type())

    def simple(function, inputs, relevance):  # RelPropSimple: z-rule on every input
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        z = function(*inputs)
        grads = torch.autograd.grad(z, inputs, safe_divide(relevance, z))
        return [t.detach() * g for t, g in zip(inputs, grads)]

    def linear(x, weight, relevance):  # alpha = 1, beta = 0
        px = x.clamp(min=0).detach().requires_grad_(True)
        nx = x.clamp(max=0).detach().requires_grad_(True)
        z1, z2 = px @ weight.clamp(min=0).T, nx @ weight.clamp(max=0).T
        s = safe_divide(relevance, z1 + z2)
        c1 = px * torch.autograd.grad(z1, px, s)[0]
        c2 = nx * torch.autograd.grad(z2, nx, s)[0]
        return (c1 + c2).detach()

    def add(a, b, relevance):
        ra, rb = simple(torch.add, [a, b], relevance)
        a_sum, b_sum = ra.sum(), rb.sum()
        a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * relevance.sum()
        b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * relevance.sum()
        return ra * safe_divide(a_fact, ra.sum()), rb * safe_divide(b_fact, rb.sum())

    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0][0])) for b in model.blocks]
    logits, weights = one_image_attention(model, image)
    for hook in hooks:
        hook.remove()
    grads = [g[0] for g in torch.autograd.grad(logits[target], weights)]
    one_hot = torch.zeros(model.config.num_classes)
    one_hot[target] = 1.0
    with torch.no_grad():
        last = inputs[-1][None]
        final = model.norm(model.blocks[-1](last)[0])[0]  # T,D
    relevance = torch.zeros_like(final)
    if model.config.pool == "cls":
        relevance[0] = linear(final[0], model.head.weight, one_hot)
    else:
        pooled_r = linear(final[prefix(model) :].mean(0), model.head.weight, one_hot)
        (patch_r,) = simple(lambda t: t.mean(0), [final[prefix(model) :]], pooled_r)
        relevance[prefix(model) :] = patch_r
    bars = []
    for index in reversed(range(len(model.blocks))):
        block, x = model.blocks[index], inputs[index]
        tokens, width = x.shape
        nh = block.attn.num_heads
        with torch.no_grad():
            h1 = block.norm1(x)
            q, k, v = block.attn.qkv(h1).reshape(tokens, 3, nh, -1).permute(1, 2, 0, 3)  # nh,T,Dh
            attention = ((q * block.attn.scale) @ k.transpose(-1, -2)).softmax(-1)
            context = (attention @ v).transpose(0, 1).reshape(tokens, width)
            attn_out = block.attn.proj(context)
            mid = x + attn_out
            h2 = block.norm2(mid)
            hidden = block.mlp.act(block.mlp.fc1(h2))
            mlp_out = block.mlp.fc2(hidden)
        r_mid, r_mlp = add(mid, mlp_out, relevance)
        r_hidden = linear(hidden, block.mlp.fc2.weight, r_mlp)
        r_mid = r_mid + linear(h2, block.mlp.fc1.weight, r_hidden)
        r_x, r_attn = add(x, attn_out, r_mid)
        r_context = linear(context, block.attn.proj.weight, r_attn)
        r_context = r_context.reshape(tokens, nh, -1).transpose(0, 1)
        r_attention, r_v = simple(torch.matmul, [attention, v], r_context)
        r_attention, r_v = r_attention / 2, r_v / 2
        bar = torch.zeros(tokens, tokens, dtype=torch.float64)
        for h in range(nh):
            bar += (grads[index][h] * r_attention[h]).double().clamp(min=0) / nh
        bars.append(bar)
        r_q, r_k = simple(lambda a, b: a @ b.transpose(-1, -2), [q, k], r_attention)
        r_qkv = torch.stack([r_q / 2, r_k / 2, r_v]).permute(2, 0, 1, 3).reshape(tokens, -1)
        relevance = r_x + linear(h1, block.attn.qkv.weight, r_qkv)
    tokens = bars[0].shape[0]
    rollout = torch.eye(tokens, dtype=torch.float64) + bars[-1]  # layer 1
    for bar in reversed(bars[:-1]):  # layers 2..L
        rollout = (torch.eye(tokens, dtype=torch.float64) + bar) @ rollout
    return to_grid(start_row(model, tokens) @ rollout, model, image)


class RegisterViT(ViT):
    """Our ViT with learned register tokens after CLS (as DINOv2 with registers, no position
    embedding for them): test-only, to check the prefix handling with num_prefix_tokens > 1."""

    def __init__(self, config: ViTConfig, registers: int) -> None:
        super().__init__(config)
        self.registers = torch.nn.Parameter(torch.zeros(1, registers, config.width))

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.registers.shape[1]

    def forward_features(self, x, attn_layers=()):
        explicit = self._layer_indices(attn_layers)
        x, grid_size = self.patch_embed(x)  # B,N,D
        x = x + self._pos_embed_for(grid_size)[:, 1:]
        batch = x.shape[0]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
        x = torch.cat([cls, self.registers.expand(batch, -1, -1), x], dim=1)  # B,1+R+N,D
        weights = {}
        for index, block in enumerate(self.blocks):
            x, layer_weights = block(x, return_weights=index in explicit)
            if layer_weights is not None:
                weights[index] = layer_weights
        return self.norm(x), weights


def register_model(registers=2) -> RegisterViT:
    reference = random_model()
    model = RegisterViT(reference.config, registers).eval()
    model.load_state_dict(reference.state_dict(), strict=False)
    with torch.no_grad():
        model.registers.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    return model


REFERENCES = {
    "gae": reference_gae,
    "attribution": reference_attribution,
    "gradcam": reference_gradcam,
}


# -- parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gae", "attribution", "gradcam"])
@pytest.mark.parametrize("pool", ["cls", "mean", "mean+cls"])
def test_batched_class_specific_maps_equal_the_one_image_reference(method, pool):
    overrides = {
        "cls": {},
        "mean": dict(pool="mean", class_token=False),
        "mean+cls": dict(pool="mean", class_token=True),
    }[pool]
    model = random_model(**overrides)
    x = images()
    targets = torch.tensor([2, 0, 3])
    result = explain(model, x, method, targets=targets)
    assert result.maps.shape == (3, 3, 5)
    assert torch.equal(result.targets, targets)
    for i in range(3):
        close(result.maps[i], REFERENCES[method](model, x[i], int(targets[i])))
    assert float(result.maps.abs().max()) > 0


@pytest.mark.parametrize("method", METHODS)
def test_register_tokens_are_prefix_tokens_for_every_method(method):
    model = register_model(registers=2)
    x = images()
    targets = torch.tensor([1, 3, 0])
    result = explain(model, x, method, targets=targets, layer=1)
    assert result.maps.shape == (3, 3, 5)
    for i in range(3):
        if method == "raw":
            expected = reference_raw(model, x[i], layer=1)
        elif method == "rollout":
            expected = reference_rollout(model, x[i])
        else:
            expected = REFERENCES[method](model, x[i], int(targets[i]))
        close(result.maps[i], expected)
    plain = explain(random_model(), x, method, targets=targets, layer=1)
    assert not torch.allclose(plain.maps, result.maps), "the registers take part"


def test_raw_and_rollout_equal_the_one_image_reference():
    model = random_model()
    x = images()
    raw = explain(model, x, "raw", layer=1)
    rollout = explain(model, x, "rollout")
    assert raw.targets is None and rollout.targets is None
    for i in range(3):
        close(raw.maps[i], reference_raw(model, x[i], layer=1))
        close(rollout.maps[i], reference_rollout(model, x[i]))


def test_class_specific_maps_differ_between_targets_and_agnostic_ones_do_not():
    model = random_model()
    x = images(batch=2)
    for method in METHODS:
        a = explain(model, x, method, targets=torch.tensor([0, 0]))
        b = explain(model, x, method, targets=torch.tensor([1, 1]))
        assert torch.equal(a.maps, b.maps) == (method in ("raw", "rollout")), method


def test_no_graph_no_parameter_grads_and_modes_restored():
    model = random_model()
    model.train()
    x = images()
    for method in METHODS:
        result = explain(model, x, method, targets="top2")
        assert not result.maps.requires_grad and result.maps.grad_fn is None
        assert not result.logits.requires_grad
    assert model.training, "the caller's mode comes back"
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not x.requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_nothing_from_the_forward_pass_outlives_a_call(method):
    model = random_model()
    alive = []
    handle = model.blocks[0].register_forward_hook(
        lambda module, args, output: alive.append(weakref.ref(output[0]))
    )
    result = explain(model, images(), method, targets="top1")
    handle.remove()
    gc.collect()
    assert alive and all(ref() is None for ref in alive), "a graph or activation was kept"
    assert result.maps.shape == (3, 3, 5)


# -- targets ---------------------------------------------------------------------------------
def test_targets_resolve_per_image():
    labels = ["cat", "dog", "bird"]
    logits = torch.tensor([[0.1, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert resolve_targets("top1", logits, labels).tolist() == [1, 0]
    assert resolve_targets("top2", logits, labels).tolist() == [2, 2]
    assert resolve_targets("dog", logits, labels).tolist() == [1, 1]
    assert resolve_targets("DOG", logits, labels).tolist() == [1, 1]
    assert resolve_targets("2", logits, labels).tolist() == [2, 2]
    assert parse_target("top3", labels).rank == 3


@pytest.mark.parametrize("spec", ["top4", "top0", "3", "-1", "horse"])
def test_bad_targets_are_input_errors(spec):
    with pytest.raises(InputError, match="--target"):
        parse_target(spec, ["cat", "dog", "bird"])


def test_methods_parse_comma_lists_and_refuse_unknown_names():
    assert parse_methods(["gae,rollout", "gae", "GradCAM"]) == ("gae", "rollout", "gradcam")
    assert parse_methods(None) == ()
    with pytest.raises(OptionError, match="unknown --method"):
        parse_methods(["lime"])


def test_class_specific_methods_refuse_a_model_without_a_head():
    model = random_model(num_classes=0)
    assert explain(model, images(), "rollout").maps.shape == (3, 3, 5)
    for method in ("gae", "attribution", "gradcam"):
        with pytest.raises(InputError, match="no classifier head"):
            explain(model, images(), method)


def test_attribution_refuses_parts_it_has_no_rule_for():
    model = random_model()
    model.blocks[0].mlp.act = torch.nn.ReLU()
    with pytest.raises(InputError, match="use --method gae"):
        explain(model, images(), "attribution")


# -- a model whose answer is known -------------------------------------------------------------
A, B = 2, 3  # patch A at grid (0, 2), patch B at grid (1, 0) of a 2x3 grid
BIG = 20.0  # a +BIG / -BIG pair of channels keeps every LayerNorm close to linear


def two_patch_model() -> ViT:
    """Class 0 reads only patch A's brightness, class 1 only patch B's, by hand-set weights.

    Channels: 0 brightness (0 black .. 2 white), 1 / 7 the +BIG / -BIG pair, 2 / 3 flags of
    positions A / B (position table), 4 CLS flag, 5 / 6 "bright at A" / "bright at B", 8 / 9
    the two class evidences. Block 1's MLP fires unit 5 only where a patch is bright AND at A
    (unit 6: at B); block 2 attends uniformly (q = 0) and moves channel 5 into channel 8 (head
    0) and 6 into 9 (head 1), negated copies into 10 and 11; the head reads 8 for class 0 and 9
    for class 1.
    """
    config = ViTConfig(
        image_size=(16, 24),
        patch_size=8,
        num_classes=2,
        width=12,
        depth=2,
        num_heads=2,
        mlp_dim=4,
    )
    model = ViT(config).eval()
    width = config.width
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.patch_embed.proj.weight[0] = 1.0 / (3 * 8 * 8)  # mean normalised pixel
        model.patch_embed.proj.bias[0] = 1.0
        model.patch_embed.proj.bias[1] = BIG
        model.patch_embed.proj.bias[7] = -BIG
        model.cls_token[0, 0, 1], model.cls_token[0, 0, 7] = BIG, -BIG
        model.cls_token[0, 0, 4] = 1.0
        model.pos_embed[0, 1 + A, 2] = 1.0
        model.pos_embed[0, 1 + B, 3] = 1.0
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        first, second = model.blocks
        # LN(x) ~ x / 8.2 here: unit 0 = 40 (LN_0 + 2 LN_2) - 12 > 0 only for bright-and-at-A.
        first.mlp.fc1.weight[0, 0], first.mlp.fc1.weight[0, 2] = 40.0, 80.0
        first.mlp.fc1.weight[1, 0], first.mlp.fc1.weight[1, 3] = 40.0, 80.0
        first.mlp.fc1.bias[:2] = -12.0
        first.mlp.fc2.weight[5, 0] = 1.0
        first.mlp.fc2.weight[6, 1] = 1.0
        head_dim = width // 2
        # Values read channel 5 (6) minus channel 10 (11), still empty here: the difference
        # cancels LayerNorm's mean, through which every token would feel every other channel.
        value = 2 * width
        second.attn.qkv.weight[value, 5], second.attn.qkv.weight[value, 10] = 50.0, -50.0
        second.attn.qkv.weight[value + head_dim, 6] = 50.0
        second.attn.qkv.weight[value + head_dim, 11] = -50.0
        # +evidence into 8 / 9 and -evidence into 10 / 11: the final LayerNorm's mean stays put,
        # so class 0's logit does not move with class 1's evidence.
        second.attn.proj.weight[8, 0], second.attn.proj.weight[10, 0] = 1.0, -1.0
        second.attn.proj.weight[9, head_dim], second.attn.proj.weight[11, head_dim] = 1.0, -1.0
        model.head.weight[0, 8] = 10.0
        model.head.weight[1, 9] = 10.0
    return model


def two_patch_image(a=1.0, b=1.0) -> torch.Tensor:
    x = -torch.ones(1, 3, 16, 24)  # black
    x[:, :, 0:8, 16:24] = a  # patch A: row 0, column 2
    x[:, :, 8:16, 0:8] = b  # patch B: row 1, column 0
    return x


def test_two_patch_model_reads_patch_a_for_class_0_and_patch_b_for_class_1():
    model = two_patch_model()
    with torch.no_grad():
        both = model(two_patch_image())[0]
        no_a = model(two_patch_image(a=-1.0))[0]
        no_b = model(two_patch_image(b=-1.0))[0]
    assert both[0] - no_a[0] > 1.0 and both[1] - no_b[1] > 1.0
    assert abs(both[0] - no_b[0]) < 0.1 * (both[0] - no_a[0])
    assert abs(both[1] - no_a[1]) < 0.1 * (both[1] - no_b[1])


@pytest.mark.parametrize("method", ["gae", "attribution", "gradcam"])
def test_class_specific_maps_point_at_the_patch_each_class_reads(method):
    model = two_patch_model()
    x = two_patch_image().expand(2, -1, -1, -1)
    result = explain(model, x, method, targets=torch.tensor([0, 1]))
    assert result.maps.shape == (2, 2, 3)
    assert result.maps[0].argmax().item() == A, result.maps[0]
    assert result.maps[1].argmax().item() == B, result.maps[1]
    rollout = explain(model, x, "rollout").maps
    assert torch.equal(rollout[0], rollout[1]), "rollout cannot tell the classes apart"


# -- scoring ---------------------------------------------------------------------------------
def test_deleting_the_patch_a_class_reads_first_drops_its_probability_first():
    from vitcli.explain.perturbation import perturbation_auc

    model = two_patch_model()
    x = two_patch_image().expand(2, -1, -1, -1)
    right = torch.zeros(2, 2, 3)
    right[0, 0, 2] = 1.0  # patch A first for class 0
    right[1, 1, 0] = 1.0  # patch B first for class 1
    wrong = right.flip(0)  # each target's object last... the other object first
    targets = torch.tensor([0, 1])
    deletion_right, insertion_right = perturbation_auc(model, x, right, targets, steps=6)
    deletion_wrong, insertion_wrong = perturbation_auc(model, x, wrong, targets, steps=6)
    assert (deletion_right < deletion_wrong - 0.05).all()
    assert (insertion_right > insertion_wrong + 0.05).all()
    blur = perturbation_auc(model, x, right, targets, steps=6, baseline="blur")
    assert all(torch.isfinite(curve).all() for curve in blur)


@pytest.fixture
def shapes_model_file(tmp_path):
    from vitcli.data.shapes import SHAPES
    from vitcli.weights.format import save_model

    model = random_model(image_size=32, num_classes=len(SHAPES), width=16, depth=2)
    return save_model(model, tmp_path / "shapes.safetensors", labels=list(SHAPES), source="test")


@pytest.mark.slow
def test_score_reports_every_method_on_one_and_two_object_images(tmp_path, shapes_model_file):
    import json

    from vitcli.data.shapes import generate
    from vitcli.services.scoring import ScoreOptions, score_explanations, table_rows
    from vitcli.weights.resolve import load_model

    classes = ("circle", "cross", "ring")
    generate(tmp_path / "two", per_class=1, image_size=32, seed=1, classes=classes, objects=2)
    generate(tmp_path / "two", per_class=1, image_size=32, seed=1, classes=classes)
    bundle = load_model(shapes_model_file)
    report = score_explanations(bundle, tmp_path / "two", ScoreOptions(steps=3, batch_size=4))
    assert report.images == 3 + 3 and not report.failures
    summary = json.loads(json.dumps(report.to_dict()))["methods"]
    assert list(summary) == [*METHODS, "random"]
    for name, scores in summary.items():
        assert scores["one_object"]["maps"] == 3 and scores["two_objects"]["maps"] == 6, name
        for group in ("one_object", "two_objects"):
            assert 0.0 <= scores[group]["pointing"] <= 1.0
            assert 0.0 <= scores[group]["deletion_auc"] <= 1.0
    # A class-agnostic map is the same for both targets: on the other object as often.
    two = summary["rollout"]["two_objects"]
    assert two["pointing"] == two["pointing_other"]
    assert len(table_rows(summary)) == len(METHODS) + 1


def test_score_refuses_classes_the_model_does_not_know(tmp_path, tiny_model_file):
    from vitcli.data.shapes import generate
    from vitcli.errors import DatasetError
    from vitcli.services.scoring import score_explanations
    from vitcli.weights.resolve import load_model

    generate(tmp_path / "d", per_class=1, image_size=32, seed=1, classes=("circle", "star"))
    with pytest.raises(DatasetError, match="does not know the classes circle, star"):
        score_explanations(load_model(tiny_model_file), tmp_path / "d")


def test_score_command_prints_a_table_and_writes_json(tmp_path, shapes_model_file):
    import json

    from typer.testing import CliRunner

    from vitcli.cli import app
    from vitcli.data.shapes import generate

    generate(tmp_path / "d", per_class=1, image_size=32, seed=2, objects=2)
    result = CliRunner().invoke(
        app,
        [
            "score",
            str(tmp_path / "d"),
            "--model",
            str(shapes_model_file),
            "--method",
            "gae,rollout",
            "--steps",
            "2",
            "--limit",
            "4",
            "-o",
            str(tmp_path / "scores.json"),
            "-w",
            "0",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "gae" in result.output and "rollout" in result.output and "random" in result.output
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["images"] == 4 and set(written["methods"]) == {"gae", "rollout", "random"}
    bad = CliRunner().invoke(app, ["score", str(tmp_path / "d"), "--method", "lime"])
    assert bad.exit_code == 2  # a usage error


@pytest.mark.parametrize("method", ["gae", "attribution", "gradcam"])
def test_class_specific_maps_work_inside_a_callers_inference_mode(method):
    model = random_model()
    x = images(batch=2)
    expected = explain(model, x, method, targets="top1").maps
    with torch.inference_mode():
        inside = explain(model, x.clone(), method, targets="top1").maps
    assert torch.equal(inside, expected)
