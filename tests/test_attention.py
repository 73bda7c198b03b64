"""`vit attention`: maps against transformers, rollout against the formula, geometry, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import checkpoints
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vitcli.cli import app
from vitcli.data.preprocess import Preprocess
from vitcli.errors import InputError
from vitcli.explain.batch import explicit_layers
from vitcli.explain.maps import (
    cls_maps,
    discard_lowest,
    fuse_heads,
    mass_mask,
    rollout,
    rollout_step,
    seeded_rollout,
)
from vitcli.model import ViT, ViTConfig
from vitcli.services.attention import AttentionOptions, attention_batches, colormaps, parse_layers
from vitcli.services.attention.batches import compute_batch, request_of
from vitcli.services.attention.files import RunContext, write_image_outputs
from vitcli.services.attention.names import output_names
from vitcli.services.attention.options import Colormap
from vitcli.services.attention.paint import Painter, Sampler
from vitcli.services.attention.png import png_bytes
from vitcli.weights.format import load_vitcli_file, save_model

ROOT = Path(__file__).resolve().parents[1]


TINY = dict(image_size=32, patch_size=8, num_classes=3, width=32, depth=2, num_heads=4, mlp_dim=64)


def tiny(**overrides) -> ViTConfig:
    return ViTConfig(**{**TINY, **overrides})


def randomised(config: ViTConfig, seed: int = 0) -> ViT:
    """Every parameter drawn from N(0, 0.3): attention far from uniform."""
    return checkpoints.randomised(config, seed=seed, std=0.3)


def bright_patch_model(image_size=(32, 48), patch_size=8) -> ViT:
    """One layer, one head, hand-set so the CLS token attends to the brightest patch.

    Patch embedding: dim 1 = mean brightness shifted so a black patch gives 0, dim 2 = a
    constant (keeps LayerNorm from erasing the brightness scale). CLS = e_0. q reads dim 0, k
    reads dim 1, so the CLS score grows with a patch's brightness.
    """
    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_classes=2,
        width=8,
        depth=1,
        num_heads=1,
        mlp_dim=8,
    )
    model = ViT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        count = 3 * patch_size * patch_size
        model.patch_embed.proj.weight[1] = 1.0 / count  # mean of normalised pixels, in [-1, 1]
        model.patch_embed.proj.bias[1] = 1.0  # black -> 0, white -> 2
        model.patch_embed.proj.bias[2] = 1.0
        model.cls_token[0, 0, 0] = 1.0
        for norm in (model.blocks[0].norm1, model.blocks[0].norm2, model.norm):
            norm.weight.fill_(1.0)
        width = config.width
        model.blocks[0].attn.qkv.weight[0, 0] = 4.0  # q_0 = 4 * LN(x)_0
        model.blocks[0].attn.qkv.weight[width, 1] = 4.0  # k_0 = 4 * LN(x)_1
    return model


def pixels(seed: int, size=(32, 32), batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=generator)


def hf_from_ours(model: ViT):
    """transformers' ViTForImageClassification (eager attention) holding our weights."""
    transformers = pytest.importorskip("transformers")
    config = model.config
    hf_config = transformers.ViTConfig(
        hidden_size=config.width,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim,
        image_size=list(config.image_size),
        patch_size=config.patch_size,
        num_labels=config.num_classes,
        layer_norm_eps=config.ln_eps,
        qkv_bias=config.qkv_bias,
        hidden_act="gelu",
        attn_implementation="eager",
    )
    hf = transformers.ViTForImageClassification(hf_config).eval()
    assert hf.config._attn_implementation == "eager"
    ours = model.state_dict()
    width = config.width
    mapped = {
        "vit.embeddings.cls_token": ours["cls_token"],
        "vit.embeddings.position_embeddings": ours["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": ours["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": ours["patch_embed.proj.bias"],
        "vit.layernorm.weight": ours["norm.weight"],
        "vit.layernorm.bias": ours["norm.bias"],
        "classifier.weight": ours["head.weight"],
        "classifier.bias": ours["head.bias"],
    }
    for i in range(config.depth):
        qkv_w, qkv_b = ours[f"blocks.{i}.attn.qkv.weight"], ours[f"blocks.{i}.attn.qkv.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            mapped[f"vit.layers.{i}.attention.{name}.weight"] = qkv_w[j * width : (j + 1) * width]
            mapped[f"vit.layers.{i}.attention.{name}.bias"] = qkv_b[j * width : (j + 1) * width]
        pairs = {
            "attention.o_proj": "attn.proj",
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        for theirs, mine in pairs.items():
            for kind in ("weight", "bias"):
                mapped[f"vit.layers.{i}.{theirs}.{kind}"] = ours[f"blocks.{i}.{mine}.{kind}"]
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return hf


# -- per-head maps against transformers --------------------------------------------------
@pytest.mark.slow  # imports transformers
@pytest.mark.parametrize("image_size", [(32, 32), (32, 48)], ids=["square", "non-square"])
def test_per_head_maps_equal_transformers_eager_attentions(image_size):
    model = randomised(tiny(image_size=image_size))
    hf = hf_from_ours(model)
    x = pixels(1, size=image_size)
    with torch.no_grad():
        reference = hf(pixel_values=x, output_attentions=True)
    options = AttentionOptions(layers=tuple(range(model.config.depth)), methods=())
    maps = compute_batch(model, x, options, labels=["a", "b", "c"])
    probabilities = reference.logits.softmax(-1)
    for row, top in zip(probabilities, maps["top"]):
        assert [index for index, _, _ in top] == row.argsort(descending=True).tolist()
        assert [score for _, _, score in top] == pytest.approx(
            row.sort(descending=True).values.tolist(), abs=1e-5
        )
    grid_h, grid_w = image_size[0] // 8, image_size[1] // 8
    assert maps["grid_size"] == (grid_h, grid_w)
    heads = maps["heads"]  # B, L, nh, Hp, Wp
    assert heads.shape == (2, model.config.depth, 4, grid_h, grid_w)
    for layer, attentions in enumerate(reference.attentions):
        assert attentions.shape[-1] == 1 + grid_h * grid_w
        for b in range(2):
            for head in range(4):
                # Token 1 + k is patch k, row-major: row k // Wp, column k % Wp.
                expected = torch.empty(grid_h, grid_w)
                for k in range(grid_h * grid_w):
                    expected[k // grid_w, k % grid_w] = attentions[b, head, 0, 1 + k]
                expected /= 1.0 - attentions[b, head, 0, 0]  # renormalised over the patches
                torch.testing.assert_close(heads[b, layer, head], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps["head_mean"], heads.mean(dim=2))


def test_only_the_needed_layers_take_the_explicit_path():
    def layers(options, depth):
        return explicit_layers(request_of(options, depth), depth)

    assert layers(AttentionOptions(layers=(-1,), methods=()), depth=6) == [5]
    assert layers(AttentionOptions(layers=(0, -2), methods=()), depth=6) == [0, 4]
    assert layers(AttentionOptions(layers=(1,)), depth=3) == [0, 1, 2]
    model = randomised(tiny(depth=3))
    x = pixels(2)
    alone = compute_batch(
        model, x, AttentionOptions(layers=(1,), methods=()), labels=["a", "b", "c"]
    )
    with_rollout = compute_batch(model, x, AttentionOptions(layers=(1,)), labels=["a", "b", "c"])
    torch.testing.assert_close(alone["heads"], with_rollout["heads"])
    assert alone["methods"] == {} and with_rollout["methods"]["rollout"].shape == (2, 4, 4)


def test_parse_layers():
    assert parse_layers(None, 12) == (11,)
    assert parse_layers(["-1", "0"], 12) == (0, 11)
    assert parse_layers(["9,10", "-2"], 12) == (9, 10)
    assert parse_layers(["all"], 3) == (0, 1, 2)
    with pytest.raises(InputError, match="out of range"):
        parse_layers(["12"], 12)
    with pytest.raises(InputError, match="layer index"):
        parse_layers(["last"], 12)


# -- rollout against the formula ----------------------------------------------------------
def reference_rollout(
    weights: list[np.ndarray], fusion: str, discard: float, grid_size
) -> np.ndarray:
    """Loop-by-loop rollout of one image: weights[l] is (nh, T, T); returns (Hp, Wp)."""
    tokens = weights[0].shape[-1]
    result = np.eye(tokens)
    for layer in weights:
        fused = {"mean": layer.mean(0), "max": layer.max(0), "min": layer.min(0)}[fusion].astype(
            np.float64
        )
        drop = int(discard * (tokens - 1))
        for row in range(tokens):
            order = sorted(range(1, tokens), key=lambda column: fused[row, column])
            for column in order[:drop]:
                fused[row, column] = 0.0
        augmented = fused + np.eye(tokens)
        for row in range(tokens):
            augmented[row] = augmented[row] / augmented[row].sum()
        result = augmented @ result
    out = np.zeros(grid_size)
    for k in range(tokens - 1):
        out[k // grid_size[1], k % grid_size[1]] = result[0, 1 + k]
    return out


@pytest.mark.parametrize(
    "fusion,discard", [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.5)]
)
def test_rollout_equals_a_straightforward_implementation(fusion, discard):
    model = randomised(tiny(image_size=(32, 48), depth=3))
    x = pixels(3, size=(32, 48), batch=3)
    with torch.no_grad():
        _, weights = model.forward_with_attention(x, range(3))
    options = AttentionOptions(layers=(-1,), head_fusion=fusion, discard_ratio=discard)
    ours = compute_batch(model, x, options, labels=["a", "b", "c"])["methods"]["rollout"]
    assert ours.shape == (3, 4, 6)
    for b in range(3):
        expected = reference_rollout(
            [weights[i][b].numpy() for i in range(3)], fusion, discard, (4, 6)
        )
        np.testing.assert_allclose(ours[b].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_every_rollout_factor_is_row_stochastic():
    model = randomised(tiny(depth=3))
    with torch.no_grad():
        _, weights = model.forward_with_attention(pixels(4), range(3))
    for fusion in ("mean", "max", "min"):
        for discard in (0.0, 0.9):
            for layer in weights.values():
                step = rollout_step(discard_lowest(fuse_heads(layer, fusion), discard, prefix=1))
                torch.testing.assert_close(step.sum(-1), torch.ones(step.shape[:-1]))
            matrix = rollout(list(weights.values()), fusion, discard, prefix=1)
            torch.testing.assert_close(matrix.sum(-1), torch.ones(matrix.shape[:-1]))
            # The vector chain the service uses is the CLS row of the full product.
            factors = [
                rollout_step(discard_lowest(fuse_heads(w, fusion), discard, 1))
                for w in weights.values()
            ]
            seed = torch.zeros(matrix.shape[0], matrix.shape[-1])
            seed[:, 0] = 1.0  # e_0: the CLS query
            torch.testing.assert_close(seeded_rollout(factors, seed), matrix[:, 0])


def test_discard_ratio_is_per_image_and_row_and_keeps_cls():
    torch.manual_seed(5)
    fused = torch.rand(3, 7, 7) + 0.01  # B, T, T; all entries positive
    fused[:, :, 0] = 1e-6  # CLS key column lowest of all: must survive anyway
    dropped = discard_lowest(fused, 0.5, prefix=1)
    torch.testing.assert_close(dropped[:, :, 0], fused[:, :, 0])
    assert ((dropped[:, :, 1:] == 0).sum(-1) == 3).all()  # int(0.5 * 6) per row, every image
    for b in range(3):
        torch.testing.assert_close(
            discard_lowest(fused[b : b + 1], 0.5, prefix=1), dropped[b : b + 1]
        )
        for row in range(7):
            kept = dropped[b, row, 1:][dropped[b, row, 1:] > 0]
            zeroed = fused[b, row, 1:][dropped[b, row, 1:] == 0]
            assert kept.min() >= zeroed.max()


def test_mass_threshold_keeps_the_smallest_set_holding_the_mass():
    torch.manual_seed(6)
    maps = torch.rand(2, 3, 4, 6)
    masks = mass_mask(maps, 0.6)
    for values, mask in zip(maps.reshape(-1, 24), masks.reshape(-1, 24)):
        share = values / values.sum()
        kept = share[mask]
        assert kept.sum() >= 0.6 - 1e-6
        assert kept.sum() - kept.min() < 0.6  # dropping the weakest kept patch falls short
        assert share[~mask].max() <= kept.min()


def test_model_without_cls_token_falls_back_to_mean_over_queries():
    model = randomised(tiny(class_token=False, pool="mean"))
    x = pixels(7)
    with torch.no_grad():
        _, weights = model.forward_with_attention(x, [1])
    maps = cls_maps(weights[1], (4, 4), prefix=0)
    torch.testing.assert_close(maps, weights[1].mean(dim=2).reshape(2, 4, 4, 4))
    matrix = rollout([weights[1]], prefix=0)
    seed = torch.full((2, 16), 1.0 / 16)  # the mean over all queries
    torch.testing.assert_close(
        seeded_rollout([rollout_step(weights[1].mean(1))], seed), matrix.mean(1)
    )


def test_bright_patch_model_looks_at_the_bright_patch():
    model = bright_patch_model()
    x = -torch.ones(1, 3, 32, 48)  # black after normalisation
    x[:, :, 8:16, 32:40] = 1.0  # white patch at grid row 1, column 4
    maps = compute_batch(model, x, AttentionOptions(layers=(0,)), labels=["a", "b"])
    assert maps["heads"][0, 0, 0].argmax().item() == 1 * 6 + 4
    assert maps["heads"][0, 0, 0, 1, 4] > 0.9
    assert maps["methods"]["rollout"][0].argmax().item() == 1 * 6 + 4


# -- geometry and drawing -------------------------------------------------------------------
def test_squash_geometry_stretches_the_grid_over_the_whole_image():
    geometry = Preprocess(size=(32, 64), resize="squash").geometry(100, 50)
    grid = np.zeros((2, 4), dtype=np.float32)
    grid[0, 3] = 1.0  # top-right patch
    sampler = Sampler.build(geometry, (100, 50), (2, 4), "nearest")
    values = sampler(grid)
    expected = np.zeros((50, 100), dtype=np.float32)
    expected[:25, 75:] = 1.0
    np.testing.assert_array_equal(values, expected)
    assert sampler.inside.all()


def test_center_crop_geometry_maps_onto_its_region_only():
    preprocess = Preprocess(size=(32, 32), resize="shorter", crop_pct=1.0)
    geometry = preprocess.geometry(
        96, 64
    )  # resized to 48x32, 8 px cropped each side = 16 original px
    assert geometry.box == pytest.approx((16.0, 0.0, 80.0, 64.0))
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[3, 0] = 1.0  # bottom-left patch of the crop
    sampler = Sampler.build(geometry, (96, 64), (4, 4), "nearest")
    values = sampler(grid)
    expected = np.zeros((64, 96), dtype=np.float32)
    expected[48:, 16:32] = 1.0
    np.testing.assert_array_equal(values * sampler.inside, expected)
    inside = np.zeros((64, 96), dtype=bool)
    inside[:, 16:80] = True
    np.testing.assert_array_equal(sampler.inside, inside)
    # Outside the crop the image is washed out, never coloured by the map.
    image = np.full((64, 96, 3), 100, dtype=np.uint8)
    out = Painter(image, sampler.inside, AttentionOptions(colormap="jet", alpha=1.0)).paint(values)
    assert (out[:, :16] == out[0, 0]).all() and (out[:, 80:] == out[0, 0]).all()
    assert tuple(out[60, 20]) == tuple(colormaps.lut("jet")[-1]) and tuple(out[5, 20]) == tuple(
        colormaps.lut("jet")[0]
    )


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
def test_sampling_keeps_constants_and_range(interpolation):
    geometry = Preprocess(size=(24, 40)).geometry(70, 45)
    sampler = Sampler.build(geometry, (70, 45), (3, 5), interpolation, blur=4.0)
    np.testing.assert_allclose(sampler(np.full((3, 5), 0.25, dtype=np.float32)), 0.25, rtol=1e-5)
    grid = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    values = sampler(grid)
    assert values.min() >= grid.min() - 1e-6 and values.max() <= grid.max() + 1e-6
    if interpolation == "nearest":
        exact = Sampler.build(geometry, (5, 3), (3, 5), "nearest")
        np.testing.assert_array_equal(exact(grid), grid)


def test_colormaps():
    for name in colormaps.COLORMAPS:
        table = colormaps.lut(name)
        assert table.shape == (256, 3) and table.dtype == np.uint8
    assert tuple(colormaps.lut("viridis")[0]) == (0x44, 0x01, 0x54)
    assert tuple(colormaps.lut("viridis")[-1]) == (0xFD, 0xE7, 0x25)
    assert tuple(colormaps.lut("inferno")[-1]) == (0xFC, 0xFF, 0xA4)
    for name in ("viridis", "inferno", "magma", "gray"):
        luminance = colormaps.lut(name).astype(float) @ [0.299, 0.587, 0.114]
        assert (np.diff(luminance) > -1.0).all(), name  # perceptual maps brighten steadily
    assert [member.value for member in Colormap] == list(colormaps.COLORMAPS)
    with pytest.raises(InputError, match="--colormap"):
        AttentionOptions(colormap="rainbow")


def test_output_names_are_deterministic_on_collisions():
    paths = ["a/cat.png", "b/cat.png", "b/Cat.jpg", "c/cat-2.png", "d/.hidden.png", "e/x:y.png"]
    assert output_names(paths) == ["cat", "cat-2", "Cat-3", "cat-2-2", "hidden", "x_y"]


# -- the CLI ------------------------------------------------------------------------------
def write_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "cat.png")
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(
        folder / "sub" / "cat.jpg"
    )
    Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(
        folder / "tall & <odd>.png"
    )
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")


@pytest.mark.slow
def test_cli_end_to_end_subprocess(tmp_path):
    model = randomised(tiny(image_size=(32, 48), depth=3))
    model_path = save_model(
        model,
        tmp_path / "m.safetensors",
        labels=["ant", "bee", "cow"],
        preprocess=Preprocess(size=(32, 48)),
    )
    images = tmp_path / "images"
    write_images(images)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitcli",
            "attention",
            str(images),
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--layer",
            "all",
            "--threshold",
            "0.6",
            "--per-head",
            "--html",
            "--batch-size",
            "2",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert process.returncode == 1, process.stderr
    assert "broken.jpg" in process.stderr
    assert "3 of 4 images written" in process.stderr and "1 failed" in process.stderr
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["cat", "cat-2", "tall & _odd_"]
    from safetensors.numpy import load_file

    for name in names:
        folder = out / name
        maps = load_file(str(folder / "maps.safetensors"))
        assert maps["heads"].shape == (3, 4, 4, 6) and maps["heads"].dtype == np.float32
        assert maps["head_mean"].shape == (3, 4, 6) and maps["rollout"].shape == (4, 6)
        assert maps["masks"].shape == (3, 4, 4, 6) and maps["layers"].tolist() == [0, 1, 2]
        mass = maps["heads"].sum(axis=(-1, -2))  # renormalised over the patches
        np.testing.assert_allclose(mass, 1.0, atol=1e-5)
        cls_mass = maps["prefix_mass"][..., 0]  # the CLS->CLS weight, taken out
        assert ((cls_mass > 0) & (cls_mass < 1)).all()
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["grid"] == [4, 6] and meta["layers"] == [0, 1, 2] and meta["query"] == "cls"
        assert meta["prediction"]["label"] in ("ant", "bee", "cow")
        assert meta["options"]["threshold"] == 0.6 and meta["preprocess"]["size"] == [32, 48]
        sheet = Image.open(folder / "sheet.png")
        assert sheet.width > 5 * 100 and sheet.height > 4 * 100  # 5 columns, 4 rows of tiles
        assert (folder / "layer02_head03.png").is_file() and (folder / "rollout.png").is_file()
    index = (out / "index.html").read_text()
    assert 'href="tall%20%26%20_odd_/sheet.png"' in index and "tall &amp; &lt;odd&gt;.png" in index
    assert "broken.jpg" in index and "<odd>" not in index


def run_cli(args):
    result = CliRunner().invoke(app, ["attention", *args])
    return result.exit_code, result.output + (
        result.stderr if result.stderr_bytes is not None else ""
    )


def test_cli_localises_the_bright_square_and_overlay_aligns(tmp_path):
    """Hand-set model + non-square photo twice the model size: the map and the drawn overlay
    must both peak on the square, through the squash geometry."""
    model_path = save_model(
        bright_patch_model(),
        tmp_path / "bright.safetensors",
        labels=["x", "y"],
        preprocess=Preprocess(size=(32, 48)),
    )
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[16:32, 64:80] = 255  # grid row 1, column 4 after the squash to 32x48
    Image.fromarray(image).save(tmp_path / "square.png")
    code, output = run_cli(
        [
            str(tmp_path / "square.png"),
            "--model",
            str(model_path),
            "--out",
            str(tmp_path / "out"),
            "--per-head",
            "--maps-format",
            "npy",
            "--interpolation",
            "nearest",
            "--colormap",
            "gray",
            "--alpha",
            "1",
            "--workers",
            "0",
        ]
    )
    assert code == 0, output
    folder = tmp_path / "out" / "square"
    heads = np.load(folder / "heads.npy")
    assert heads.shape == (1, 1, 4, 6) and np.unravel_index(heads[0, 0].argmax(), (4, 6)) == (1, 4)
    assert np.unravel_index(np.load(folder / "rollout.npy").argmax(), (4, 6)) == (1, 4)
    labelled = np.asarray(Image.open(folder / "layer00_head00.png").convert("L")).astype(float)
    scale = labelled.shape[1] / 96
    overlay = labelled[: round(64 * scale)]  # the caption strip below it: title, note, key
    top, left = int(16 * scale), int(64 * scale)
    size = int(16 * scale)
    assert (
        overlay[top + 1 : top + size - 1, left + 1 : left + size - 1].min() == 255
    )  # peak colour on the square
    rest = overlay.copy()
    rest[top - 1 : top + size + 1, left - 1 : left + size + 1] = 0
    assert rest.max() < 128


def test_cli_mean_pooled_model_and_user_errors(tmp_path):
    model_path = save_model(
        randomised(tiny(class_token=False, pool="mean")), tmp_path / "m.safetensors"
    )
    Image.new("RGB", (40, 40), (90, 20, 200)).save(tmp_path / "a.png")
    code, output = run_cli(
        [
            str(tmp_path / "a.png"),
            "--model",
            str(model_path),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "0",
            "--style",
            "mask",
            "--blur",
            "8",
        ]
    )
    assert code == 0, output
    meta = json.loads((tmp_path / "o" / "a" / "meta.json").read_text())
    assert meta["query"] == "mean" and "no CLS token" in meta["query_note"]
    code, output = run_cli(
        [
            str(tmp_path / "a.png"),
            "--model",
            str(model_path),
            "--layer",
            "5",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "out of range" in output
    code, output = run_cli(
        [
            str(tmp_path / "a.png"),
            "--model",
            str(model_path),
            "--style",
            "fancy",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "--style" in output  # a usage error, from Click


# -- fast drawing and writing, checked against the plain formulas ------------------------
def reference_blend(image, values, inside, options):
    """The overlay formula pixel by pixel in float32, written out without any sharing."""
    alpha = np.float32(options.overlay_alpha)
    pixels = image.astype(np.float32)
    if options.style == "heatmap":
        colours = colormaps.apply(values, options.colormap.value).astype(np.float32)
        out = pixels * (np.float32(1) - alpha) + colours * alpha
    else:
        out = pixels * ((1.0 - alpha) + alpha * values)[..., None].astype(np.float32)
    washed = pixels * 0.3 + 215.0 * 0.7
    out = np.where(inside[..., None], out, washed)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "style,alpha", [("heatmap", None), ("heatmap", 0.37), ("mask", None), ("mask", 0.6)]
)
def test_painter_equals_the_overlay_formula_for_any_view(style, alpha):
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    values = rng.random((30, 41)).astype(np.float32)
    values[0, 0], values[1, 1] = 0.0, 1.0
    rectangle = np.zeros((30, 41), dtype=bool)
    rectangle[3:27, 5:33] = True
    ragged = rng.random((30, 41)) > 0.4  # not a rectangle: the general path
    options = AttentionOptions(style=style, alpha=alpha, colormap="inferno")
    for inside in (
        np.ones((30, 41), dtype=bool),
        rectangle,
        ragged,
        np.zeros((30, 41), dtype=bool),
    ):
        painter = Painter(image, inside, options)
        np.testing.assert_array_equal(
            painter.paint(values), reference_blend(image, values, inside, options)
        )


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (37, 53), (200, 301)])
def test_png_encoder_round_trips_exactly(shape):
    import io

    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    pixels[: shape[0] // 2] = pixels[0]  # repeated rows, the case the Up filter turns into zeros
    data = png_bytes(pixels)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(decoded), pixels)
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(png_bytes(Image.fromarray(pixels).convert("RGBA"))))),
        pixels,
    )
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(pixels.astype(np.float32))


def test_sheet_from_the_decoders_display_equals_the_sheet_from_a_second_decode(tmp_path):
    """The loader hands attention the sheet-sized original; drawing on it must give the same
    sheet as decoding the file again (a PNG, so both decodes are exact)."""
    model = randomised(tiny(image_size=(32, 48), depth=2))
    bundle = load_vitcli_file(
        save_model(
            model,
            tmp_path / "m.safetensors",
            preprocess=Preprocess(size=(32, 48), resize="shorter", crop_pct=0.9),
        )
    )
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(rng.integers(0, 256, (90, 60, 3), dtype=np.uint8)).save(
        tmp_path / "small.png"
    )  # below tile size
    # A large JPEG that the tiny model decodes in draft mode at 1/8 scale (200x150): less than
    # a 224 tile, so the sheet must come from a fresh decode at a larger draft scale.
    Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)).save(
        tmp_path / "big.jpg", quality=90
    )
    # --fast-decode: the draft path (exact decoding, the default, decodes big.jpg in full).
    options = AttentionOptions(layers=(-1,), batch_size=3, workers=0, fast_decode=True)
    paths = [str(tmp_path / "wide.png"), str(tmp_path / "small.png"), str(tmp_path / "big.jpg")]
    ((results, failures),) = list(attention_batches(bundle, paths, options, display_long_side=224))
    assert not failures
    assert results[0].display.shape == (134, 224, 3)  # scaled down to the tile
    assert results[1].display.shape == (90, 60, 3)  # smaller than a tile: as decoded
    assert results[2].display.shape == (
        150,
        200,
        3,
    )  # the model's draft decode, smaller than the tile
    context = RunContext.from_bundle(bundle, options)
    for result in results:
        write_image_outputs(result, tmp_path / "with" / Path(result.path).stem, context)
        result.display = None
        write_image_outputs(result, tmp_path / "without" / Path(result.path).stem, context)
        name = Path(result.path).stem
        assert (tmp_path / "with" / name / "sheet.png").read_bytes() == (
            tmp_path / "without" / name / "sheet.png"
        ).read_bytes()


def test_a_registered_method_gets_a_tile_and_an_array(tmp_path):
    """The plug-in point for new methods: a class-agnostic one reading the shared forward's
    weights, and a class-specific one using autograd (as gradient methods will)."""
    from vitcli.services.attention import METHODS, Method, class_specific, register, run

    def last_cls(forward):
        weights = forward.weights[forward.model.config.depth - 1]  # B,nh,T,T
        return weights.mean(1)[:, 0, forward.prefix :].reshape(-1, *forward.grid_size)

    def gradient_of_target(model, pixels, targets):
        pixels = pixels.detach().requires_grad_(True)
        logits = model(pixels)
        logits.gather(1, targets[:, None]).sum().backward()
        patch = model.config.patch_size
        saliency = pixels.grad.abs().sum(1)  # B,H,W
        return torch.nn.functional.avg_pool2d(saliency[:, None], patch)[:, 0]  # B,Hp,Wp

    register(Method("last-cls", last_cls, layers=lambda depth: [depth - 1]))
    register(class_specific("saliency", gradient_of_target))
    try:
        model_path = save_model(
            randomised(tiny(depth=2)), tmp_path / "m.safetensors", labels=["a", "b", "c"]
        )
        Image.new("RGB", (40, 40), (90, 20, 200)).save(tmp_path / "a.png")
        options = AttentionOptions(
            inputs=(str(tmp_path / "a.png"),),
            out=tmp_path / "o",
            model=str(model_path),
            methods=("rollout", "last-cls", "saliency"),
            workers=0,
        )
        summary = run(options)
        assert not summary.failures
        from safetensors.numpy import load_file

        maps = load_file(str(tmp_path / "o" / "a" / "maps.safetensors"))
        heads = maps["heads"]  # (1, nh, 4, 4): the last layer's CLS rows, renormalised
        raw = heads[0] * (1.0 - maps["prefix_mass"][0].sum(-1))[:, None, None]
        np.testing.assert_allclose(maps["last-cls"], raw.mean(0), rtol=1e-5)
        # A class-specific map is named after its method and target.
        assert maps["saliency.top1"].shape == (4, 4) and (maps["saliency.top1"] > 0).all()
        meta = json.loads((tmp_path / "o" / "a" / "meta.json").read_text())
        assert meta["maps"]["saliency.top1"] == [4, 4]
        with pytest.raises(InputError, match="unknown --method"):
            AttentionOptions(methods=("nope",))
    finally:
        METHODS.pop("last-cls", None)
        METHODS.pop("saliency", None)


def test_help_lists_choices_and_examples():
    result = CliRunner().invoke(app, ["attention", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ("mean|max|min", "heatmap|mask", "per-map|shared", "safetensors|npy", "Examples"):
        assert text in result.output
    for flag in ("--per-head", "--html", "--rollout"):
        (line,) = [line for line in result.output.splitlines() if f"{flag} " in line][:1]
        assert "<bool>" not in line


def test_building_the_cli_does_not_import_torch():
    """torch must load after prefer_passive_waiting has set the OpenMP policy (and --help
    stays fast): the CLI's imports of the attention option Enums must not pull it in."""
    code = "import sys, vitcli.cli; sys.exit('torch' in sys.modules)"
    process = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        capture_output=True,
    )
    assert process.returncode == 0, process.stderr
