"""The VLM skeleton (vlmjax.models.vlm): each family's Flax NNX module holds exactly the parameter dict the converters,
orbax checkpoints and sharding rules use; the compiled forward does not grow with depth (layers run under a scan)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlmjax.config import CLIPVisionConfig, DecoderConfig, LlavaConfig, RopeConfig
from vlmjax.models import instructblip, llava, llava_next, paligemma, qwen2_5_vl, qwen2_vl, vlm


def text_config(layers: int, **changes) -> DecoderConfig:
    base = DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=layers,
                         num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope=RopeConfig(theta=1e4))
    return dataclasses.replace(base, **changes)


def config(family: str, layers: int):
    """A small config of the family with `layers` decoder layers and `layers` vision layers."""
    if family == "qwen2_vl":
        vision = qwen2_vl.Qwen2VLVisionConfig(embed_dim=16, intermediate_size=32, num_layers=layers, num_heads=2,
                                              out_hidden_size=32, patch_size=2)
        text = text_config(layers, model_type="qwen2", attention_bias=True, tie_word_embeddings=True,
                           rope=RopeConfig(theta=1e4, mrope_section=(2, 1, 1)))
        return qwen2_vl.Qwen2VLConfig(vision=vision, text=text, image_token_id=63)
    if family == "qwen2_5_vl":
        base = config("qwen2_vl", layers)
        vision = qwen2_5_vl.Qwen2_5VLVisionConfig(**vars(base.vision), window_size=8, full_attention_layers=(1,))
        return qwen2_5_vl.Qwen2_5VLConfig(vision=vision, text=base.text, image_token_id=63)
    if family == "paligemma":  # Gemma 2: sandwich norms, soft-caps, alternating sliding layers
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=layers, num_heads=2, image_size=28,
                                  patch_size=14, hidden_act="gelu_pytorch_tanh")
        fields = {f.name: getattr(text_config(layers), f.name) for f in dataclasses.fields(DecoderConfig)}
        fields.update(model_type="gemma2", sliding_window=4, norm_offset=1.0, final_logit_softcap=30.0,
                      tie_word_embeddings=True)
        text = paligemma.GemmaConfig(**fields, attn_logit_softcap=50.0, sandwich_norms=True,
                                     layer_sliding=tuple(i % 2 == 0 for i in range(layers)))
        return paligemma.PaliGemmaConfig(vision=vision, text=text, image_token_id=63)
    if family == "instructblip":  # `layers` Q-Former layers too, cross-attention every 2
        vision = instructblip.BlipVisionConfig(hidden_size=16, intermediate_size=32, num_layers=layers, num_heads=2,
                                               image_size=28, patch_size=14)
        qformer = instructblip.QFormerConfig(hidden_size=16, intermediate_size=32, num_layers=layers, num_heads=2,
                                             vocab_size=40, max_position_embeddings=32, encoder_hidden_size=16)
        return instructblip.InstructBlipConfig(vision=vision, qformer=qformer, text=text_config(layers),
                                               image_token_id=63, num_query_tokens=4)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=layers, num_heads=2, image_size=28,
                              patch_size=14)
    base = LlavaConfig(vision=vision, text=text_config(layers), image_token_id=63, vision_feature_layers=(-2,),
                       vision_feature_select_strategy="default")
    if family == "llava":
        return base
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlavaConfig) if f.name != "model_type"}
    return llava_next.LlavaNextConfig(**fields, image_grid_pinpoints=((28, 56),))


def abstract_batch(family: str, cfg) -> dict:
    """Shapes of a prepared batch of 2 samples of 16 tokens with images."""
    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
    batch = {"input_ids": spec((2, 16)), "attention_mask": spec((2, 16))}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        v = cfg.vision
        return {**batch, "position_ids": spec((3, 2, 16)), "rope_deltas": spec((2, 1)),
                "pixel_values": spec((32, v.patch_dim), jnp.float32), "vision_segment_ids": spec((32,)),
                "vision_positions": spec((32, 2)), "vision_window_order": spec((32,)),
                "vision_window_ids": spec((32,))}
    if family == "paligemma":
        batch["token_type_ids"] = spec((2, 16))
    batch["pixel_values"] = spec((3 if family == "llava_next" else 2, 3, 28, 28), jnp.float32)
    if family == "instructblip":
        batch.update(qformer_input_ids=spec((2, 6)), qformer_attention_mask=spec((2, 6), jnp.bool_))
    if family == "llava_next":
        batch["image_feature_index"] = spec((2, 16))
    return batch


def lowered_ops(family: str, layers: int) -> int:
    """The number of StableHLO operations in the lowered forward of a `layers`-deep model."""
    cfg = config(family, layers)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), vlm.param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    text = jax.jit(lambda p, b: vlm.forward(p, b, cfg)).lower(params, abstract_batch(family, cfg)).as_text()
    return len(re.findall(r"\bstablehlo\.[a-z_]+", text))


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma", "instructblip"])
def test_the_compiled_forward_does_not_grow_with_depth(family):
    shallow, deep = lowered_ops(family, 2), lowered_ops(family, 16)
    assert shallow > 100 and deep <= 1.1 * shallow, (shallow, deep)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma", "instructblip"])
def test_the_module_state_is_the_params_dict(family):
    """The module tree's Param state, as a pure dict, is the params pytree (same paths, shapes), and binding params
    to the module hands back the very same arrays; every param has a row in the family's HF key table."""
    cfg = config(family, 2)
    params = vlm.init_params(cfg, nnx.Rngs(0))
    assert jax.tree.map(lambda a: a.shape, params) == vlm.param_shapes(cfg)
    assert params["text"]["layers"]["q"]["kernel"].shape == (2, 32, 32)
    module = vlm.bind(cfg, params)
    assert isinstance(module, vlm.model_class(cfg)) and module.text.layers.q.kernel[...] is \
        params["text"]["layers"]["q"]["kernel"]
    back = nnx.to_pure_dict(nnx.state(module))
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, back, params))
    family_rows = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl,
                   "paligemma": paligemma, "instructblip": instructblip}[family].KEY_ROWS
    table = {row[1] for row in family_rows}
    flat = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert flat <= table


def test_init_params_is_seeded_and_hf_like():
    cfg = config("llava", 2)
    a, b = vlm.init_params(cfg, nnx.Rngs(0)), vlm.init_params(cfg, nnx.Rngs(1))
    kernel = np.asarray(a["text"]["layers"]["q"]["kernel"])
    assert 0.015 < kernel.std() < 0.025 and abs(kernel.mean()) < 0.01
    assert not np.array_equal(kernel, b["text"]["layers"]["q"]["kernel"])
    np.testing.assert_array_equal(a["text"]["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(a["vision"]["layers"]["q"]["bias"], 0.0)
