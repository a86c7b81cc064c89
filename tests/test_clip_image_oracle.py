"""clip_image against Hugging Face transformers' CLIP vision models with random weights, at the
sizes of CLIP ViT-B/32 (default run) and ViT-L/14 (slow), loaded from Hugging Face
folders and from OpenAI-layout state dicts; and a whole CLIPModel as the re-ranker.

transformers is a test-only dependency (`pip install --no-deps transformers` plus
huggingface_hub and tokenizers); nothing here touches the network.
"""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import transformers

import clip_image
import clip_text


def hf_vision_model(width: int, heads: int, layers: int, patch: int, image_size: int, projection: int):
    """A transformers CLIPVisionModelWithProjection with seeded random weights (biases and LayerNorms too)."""
    config = transformers.CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_attention_heads=heads, num_hidden_layers=layers,
        patch_size=patch, image_size=image_size, projection_dim=projection,
    )
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # move every bias and LayerNorm away from 0 and 1 so a swapped key shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def to_openai_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face vision keys -> OpenAI CLIP `visual.*` keys (the published correspondence,
    written out here independently of clip_image's mapping), plus text-side keys to be skipped."""
    v = "vision_model."
    out = {
        "visual.conv1.weight": state[v + "embeddings.patch_embedding.weight"],
        "visual.class_embedding": state[v + "embeddings.class_embedding"],
        "visual.positional_embedding": state[v + "embeddings.position_embedding.weight"],
        "visual.proj": state["visual_projection.weight"].t().contiguous(),
    }
    names = {"pre_layrnorm": "ln_pre", "post_layernorm": "ln_post"}
    for p in ("weight", "bias"):
        for a, b in names.items():
            out[f"visual.{b}.{p}"] = state[f"{v}{a}.{p}"]
    per_layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                 "self_attn.out_proj": "attn.out_proj"}
    layers = {k.split(".")[3] for k in state if k.startswith(v + "encoder.layers.")}
    for i in layers:
        hf, oa = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[oa + f"attn.in_proj_{p}"] = torch.cat([state[hf + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            for a, b in per_layer.items():
                out[oa + f"{b}.{p}"] = state[hf + f"{a}.{p}"]
    out.update({"token_embedding.weight": torch.zeros(10, 8), "logit_scale": torch.tensor(4.6052)})  # text side
    return out


def pixels(image_size: int, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, image_size, image_size, generator=g)  # (B, 3, S, S), already "normalised"


def assert_parity(model, encoder, x):
    with torch.no_grad():
        reference = model(pixel_values=x)
        states, pooled = encoder(x)
    assert (states - reference.last_hidden_state).abs().max() < 1e-4
    assert (pooled - reference.image_embeds).abs().max() < 1e-4


@pytest.fixture(scope="module")
def b32(tmp_path_factory):
    model = hf_vision_model(768, 12, 12, 32, 224, 512)
    folder = tmp_path_factory.mktemp("hf_vision_b32")
    model.save_pretrained(folder)
    return model, folder


def test_vit_b32_size_hugging_face_parity(b32):
    model, folder = b32
    encoder = clip_image.load_clip_image(folder)
    assert encoder.config == clip_image.VisionConfig.vit_b32()
    assert_parity(model, encoder, pixels(224))


def test_vit_b32_size_openai_state_dict_parity(b32, tmp_path):
    model, _ = b32
    state = to_openai_keys(model.state_dict())
    save_file(state, str(tmp_path / "openai.safetensors"))
    encoder = clip_image.load_clip_image(tmp_path / "openai.safetensors")
    assert encoder.config == clip_image.VisionConfig.vit_b32()  # heads by OpenAI's width // 64 rule
    assert_parity(model, encoder, pixels(224))
    # OpenAI ships fp16 weights in a pickled state dict: read without unpickling objects, kept in fp32.
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "ViT-B-32.pt")
    loaded = clip_image.load_clip_image(tmp_path / "ViT-B-32.pt").state_dict()
    assert all(torch.equal(loaded[k], v.half().float()) for k, v in encoder.state_dict().items())


@pytest.mark.slow
def test_vit_l14_size_hugging_face_and_openai_parity(tmp_path):
    model = hf_vision_model(1024, 16, 24, 14, 224, 768)
    model.save_pretrained(tmp_path / "hf")
    encoder = clip_image.load_clip_image(tmp_path / "hf")
    assert encoder.config == clip_image.VisionConfig.vit_l14()
    x = pixels(224, batch=2)
    assert_parity(model, encoder, x)
    save_file(to_openai_keys(model.state_dict()), str(tmp_path / "openai.safetensors"))
    assert_parity(model, clip_image.load_clip_image(tmp_path / "openai.safetensors"), x)


def test_vision_model_without_projection_and_heads_from_config(tmp_path):
    config = transformers.CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_attention_heads=4,
                                           num_hidden_layers=2, patch_size=8, image_size=32)
    torch.manual_seed(2)
    model = transformers.CLIPVisionModel(config).eval()
    model.save_pretrained(tmp_path)
    encoder = clip_image.load_clip_image(tmp_path)
    assert (encoder.config.heads, encoder.config.image_size, encoder.config.patch_size) == (4, 32, 8)
    x = pixels(32)
    with torch.no_grad():
        reference = model(pixel_values=x)
        states, pooled = encoder(x)
    assert (states - reference.last_hidden_state).abs().max() < 1e-4
    assert (pooled - reference.pooler_output).abs().max() < 1e-4


def test_gelu_variant_is_refused(tmp_path):
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                           num_hidden_layers=1, patch_size=16, image_size=32, hidden_act="gelu")
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path)
    with pytest.raises(clip_image.ClipImageError, match="quick_gelu"):
        clip_image.load_clip_image(tmp_path)


def test_clip_model_reranker_matches_transformers_cosine_similarity(tmp_path):
    """A whole Hugging Face CLIPModel read by load_reranker: scores are transformers' cosine similarities."""
    text = dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2)
    vision = dict(hidden_size=96, intermediate_size=384, num_attention_heads=3, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(3)
    full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                          projection_dim=48)).eval()
    full.save_pretrained(tmp_path / "clip")
    reranker = clip_image.load_reranker(tmp_path / "clip")
    assert reranker.model.visual.config.heads == 3 and reranker.model.text.config.heads == 2
    assert torch.allclose(reranker.model.logit_scale, full.logit_scale)
    g = torch.Generator().manual_seed(4)
    candidates = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
    caption = "a photo of a red circle"
    scores = reranker(candidates, caption)
    x = clip_image.preprocess(candidates, 32)
    tokens = clip_text.Tokenizer()([caption], context_length=77)
    with torch.no_grad():
        image = full.visual_projection(full.vision_model(pixel_values=x).pooler_output)
        words = full.text_projection(full.text_model(input_ids=tokens).pooler_output)
    expected = (F.normalize(image, dim=-1) @ F.normalize(words, dim=-1).t())[:, 0]
    assert scores.shape == (5,)
    assert (torch.from_numpy(scores) - expected).abs().max() < 1e-5
    # convert once to the native format: same scores
    assert clip_image.main(["convert", str(tmp_path / "clip"), str(tmp_path / "native")]) == 0
    native = clip_image.load_reranker(tmp_path / "native")
    assert (torch.from_numpy(native(candidates, caption)) - expected).abs().max() < 1e-5
