"""Static model configuration, read from a Hugging Face config (via `transformers.AutoConfig`).

The config is a frozen, hashable dataclass so it can be a static argument of `jax.jit`. Only what the forward pass
needs is kept; the HF config object itself travels beside it for saving and for the reference comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from vlmjax.errors import VlmJaxError

SUPPORTED_DECODERS = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    mrope_section: Optional[tuple[int, ...]] = None  # Qwen2-VL multimodal RoPE split of the rotary half-dims


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A Llama-family causal decoder (Llama, Vicuna, Mistral, Qwen2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    hidden_act: str = "silu"
    attention_bias: bool = False  # biases on q/k/v (Qwen2)
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # Mistral: key j visible to query i iff i - window < j <= i
    tie_word_embeddings: bool = False
    norm_offset: float = 0.0  # Gemma: 1.0, its RMSNorms scale by (1 + w) (layers.rms_norm)
    final_logit_softcap: Optional[float] = None  # Gemma 2: logits = cap * tanh(logits / cap)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """LLaVA-1.5 style: CLIP vision tower -> 2-layer MLP projector -> decoder, image tokens replaced in place."""

    vision: CLIPVisionConfig
    text: DecoderConfig
    image_token_id: int
    vision_feature_layers: tuple[int, ...]  # HF hidden_states indices (0 = embeddings after pre-norm), may be negative
    vision_feature_select_strategy: str  # "default" drops the CLS token, "full" keeps it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    model_type: str = "llava"

    @property
    def tokens_per_image(self) -> int:
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)


def _get(cfg, name, default=None):
    return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


def rope_from_hf(text_cfg) -> RopeConfig:
    """Both the new `rope_parameters` dict and the old `rope_theta` + `rope_scaling` fields."""
    params = dict(_get(text_cfg, "rope_parameters", None) or {})
    legacy = _get(text_cfg, "rope_scaling", None) or {}
    if not params:
        params = dict(legacy)
        params.setdefault("rope_theta", _get(text_cfg, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "mrope":  # Qwen2-VL's old config spelling
        rope_type = "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise VlmJaxError(
            f"Unsupported rope type {rope_type!r} in the text config. vlmjax implements {SUPPORTED_ROPE_TYPES}; "
            "convert the checkpoint with one of those or add the type to vlmjax/models/layers.py:rope_inv_freq."
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise VlmJaxError("partial_rotary_factor != 1 is not supported; this decoder family does not use it.")
    section = params.get("mrope_section") or legacy.get("mrope_section")
    return RopeConfig(
        theta=float(params.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        mrope_section=tuple(section) if section else None,
    )


def decoder_from_hf(tc) -> DecoderConfig:
    model_type = _get(tc, "model_type")
    if model_type not in SUPPORTED_DECODERS:
        raise VlmJaxError(
            f"Unsupported text model_type {model_type!r}. vlmjax supports decoders {SUPPORTED_DECODERS}."
        )
    heads = int(_get(tc, "num_attention_heads"))
    head_dim = _get(tc, "head_dim", None) or _get(tc, "hidden_size") // heads
    sliding = _get(tc, "sliding_window", None)
    if model_type == "qwen2" and not _get(tc, "use_sliding_window", False):
        sliding = None
    return DecoderConfig(
        model_type=model_type,
        vocab_size=int(_get(tc, "vocab_size")),
        hidden_size=int(_get(tc, "hidden_size")),
        intermediate_size=int(_get(tc, "intermediate_size")),
        num_layers=int(_get(tc, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(_get(tc, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(_get(tc, "rms_norm_eps", 1e-6)),
        rope=rope_from_hf(tc),
        hidden_act=_get(tc, "hidden_act", "silu"),
        attention_bias=bool(_get(tc, "attention_bias", model_type == "qwen2")),
        o_bias=bool(_get(tc, "attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(_get(tc, "mlp_bias", False)),
        sliding_window=int(sliding) if sliding else None,
        tie_word_embeddings=bool(_get(tc, "tie_word_embeddings", False)),
    )


def clip_from_hf(vc) -> CLIPVisionConfig:
    if _get(vc, "model_type") not in ("clip_vision_model", "clip"):
        raise VlmJaxError(
            f"Unsupported vision tower {_get(vc, 'model_type')!r}; vlmjax's LLaVA supports CLIP vision towers."
        )
    return CLIPVisionConfig(
        hidden_size=int(_get(vc, "hidden_size")),
        intermediate_size=int(_get(vc, "intermediate_size")),
        num_layers=int(_get(vc, "num_hidden_layers")),
        num_heads=int(_get(vc, "num_attention_heads")),
        image_size=int(_get(vc, "image_size")),
        patch_size=int(_get(vc, "patch_size")),
        num_channels=int(_get(vc, "num_channels", 3)),
        layer_norm_eps=float(_get(vc, "layer_norm_eps", 1e-5)),
        hidden_act=_get(vc, "hidden_act", "quick_gelu"),
    )


def llava_from_hf(hf_config) -> LlavaConfig:
    layers = hf_config.vision_feature_layer
    layers = (int(layers),) if isinstance(layers, int) else tuple(int(x) for x in layers)
    strategy = hf_config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise VlmJaxError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}.")
    image_token_id = _get(hf_config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = _get(hf_config, "image_token_index")
    text_cfg = hf_config.text_config
    text = decoder_from_hf(text_cfg)
    tie = _get(hf_config, "tie_word_embeddings", None)
    if tie is not None and _get(text_cfg, "tie_word_embeddings", None) is None:
        text = dataclasses.replace(text, tie_word_embeddings=bool(tie))
    return LlavaConfig(
        vision=clip_from_hf(hf_config.vision_config),
        text=text,
        image_token_id=int(image_token_id),
        vision_feature_layers=layers,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=_get(hf_config, "projector_hidden_act", "gelu"),
        projector_bias=bool(_get(hf_config, "multimodal_projector_bias", True)),
    )

