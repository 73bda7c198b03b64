"""Model-only speed of each ViT family: vitcli against transformers (and timm when importable) on
the same weights.

For every family a transformers model of the published shape is built with random weights (no
download), saved as a real folder and loaded with vitcli.load_model, so both sides hold the same
tensors; the outputs are checked to agree before timing. Each side runs the fused attention path
(transformers' "sdpa", our scaled_dot_product_attention). Forward passes are interleaved and
repeated, and the median per image is reported, because the machine may be shared. timm is
timed too when it can be imported (it needs torchvision) on the same state dict.

    python bench/families.py                       # S-size towers, batch 8, 224 px
    python bench/families.py --size B --batch 16 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"Ti": (192, 3), "S": (384, 6), "B": (768, 12)}


def build(family: str, width: int, heads: int, depth: int, image: int):
    """(transformers model, what to compare) for a family at a given width."""
    import transformers as T

    common = dict(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        image_size=image,
        attn_implementation="sdpa",
    )
    if family == "deit-distilled":
        config = T.DeiTConfig(**common, patch_size=16, intermediate_size=4 * width, num_labels=1000)
        return T.DeiTForImageClassificationWithTeacher(config), "logits"
    if family == "dinov2":
        config = T.Dinov2Config(**common, patch_size=14, layer_norm_eps=1e-6)
        return T.Dinov2Model(config), "pooler_output"
    if family == "dinov2-reg4":
        config = T.Dinov2WithRegistersConfig(
            **common, patch_size=14, layer_norm_eps=1e-6, num_register_tokens=4
        )
        return T.Dinov2WithRegistersModel(config), "pooler_output"
    if family == "clip":
        config = T.CLIPVisionConfig(
            **common, patch_size=16, intermediate_size=4 * width, projection_dim=512
        )
        return T.CLIPVisionModelWithProjection(config), "image_embeds"
    if family == "siglip":
        config = T.SiglipVisionConfig(**common, patch_size=16, intermediate_size=4 * width)
        return T.SiglipVisionModel(config), "pooler_output"
    raise ValueError(family)


def timm_twin(bundle):
    """timm's VisionTransformer with our weights, or None when timm is not importable."""
    try:
        import timm  # noqa: F401  (it needs torchvision; absent here means no timm column)
    except ImportError:
        return None
    config = bundle.config
    kwargs: dict = dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.num_heads,
        num_classes=config.num_classes,
        class_token=config.class_token,
        reg_tokens=config.reg_tokens,
        no_embed_class=config.no_embed_class,
        pre_norm=config.pre_norm,
        init_values=config.layer_scale,
        global_pool={"cls": "token", "mean": "avg", "map": "map"}.get(config.pool, "token"),
        mlp_ratio=config.mlp_dim / config.width,
        act_layer={"quick_gelu": "quick_gelu", "gelu_tanh": "gelu_tanh"}.get(config.act, "gelu"),
    )
    if config.dist_token:
        from timm.models.deit import VisionTransformerDistilled

        model = VisionTransformerDistilled(**kwargs)
    else:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**kwargs, fc_norm=config.fc_norm)
    try:
        model.load_state_dict(bundle.model.state_dict(), strict=True)
    except RuntimeError:
        return None
    return model.eval()


def per_image(fn, x, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) / x.shape[0])
    return times


def main() -> None:
    from vitcli.weights.resolve import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="S", choices=sorted(SIZES))
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", default="deit-distilled,dinov2,dinov2-reg4,clip,siglip")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    width, heads = SIZES[args.size]
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image, args.image)
    rows = []
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.size} depth {args.depth}, batch {args.batch}"
    )
    print(
        f"{'family':16s} {'vitcli ms/img':>14s} {'transformers':>13s} {'ratio':>6s} "
        f"{'timm':>8s} {'ratio':>6s}  max|diff|"
    )
    for family in args.families.split(","):
        reference, field = build(family, width, heads, args.depth, args.image)
        reference.eval()
        with tempfile.TemporaryDirectory() as folder:
            reference.save_pretrained(folder)
            bundle = load_model(folder)
        ours = bundle.model
        twin = timm_twin(bundle)
        with torch.inference_mode():
            expected = getattr(reference(pixel_values=x), field)
            got = ours(x) if field == "logits" else ours.embed(x)
            diff = (expected - got).abs().max().item()
            for _ in range(2):  # warm-up: thread pools, allocator, resampled tables
                ours(x), reference(pixel_values=x), twin(x) if twin is not None else None
            mine, theirs, timms = [], [], []
            for _ in range(args.repeats):  # interleaved so load changes hit every side
                mine += per_image(ours, x, 1)
                theirs += per_image(lambda b, model=reference: model(pixel_values=b), x, 1)
                if twin is not None:
                    timms += per_image(twin, x, 1)
        ms = statistics.median(mine) * 1e3
        hf = statistics.median(theirs) * 1e3
        tm = statistics.median(timms) * 1e3 if timms else None
        row = dict(family=family, vitcli_ms=ms, transformers_ms=hf, timm_ms=tm, max_diff=diff)
        rows.append(row)
        timm_text = f"{tm:8.2f} {tm / ms:6.2f}" if tm else f"{'-':>8s} {'-':>6s}"
        print(f"{family:16s} {ms:14.2f} {hf:13.2f} {hf / ms:6.2f} {timm_text}  {diff:.1e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
