"""Attention in query blocks (models/layers.attention): with QUERY_BLOCK_BYTES set so small that every attention of
the tiny models runs in several blocks (the last one padded), the forward, the row probes and the interventions at
the attention sites equal the whole-pattern path (forced by a hook that does not allow blocks) on a left-padded
batch and on every family (Mistral's sliding window, Qwen2-VL's vision tower, PaliGemma's prefix, LLaVA-NeXT,
InstructBLIP);
a hook that does not allow blocks, or captures the pattern, gets the whole pattern; a hook that claims to allow
them but records at the pattern is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.family_fixtures import checkpoints, model_inputs, random_images
from vlmjax import interventions as iv
from vlmjax import probes
from vlmjax.errors import VlmJaxError
from vlmjax.hooks import Capture, Hook
from vlmjax.models import layers
from vlmjax.processors import IMAGE_PROMPT
from vlmjax.testing.tiny import make_tiny_llava
from vlmjax.testing.tiny_instructblip import make_tiny_instructblip
from vlmjax.testing.tiny_llava_next import make_tiny_llava_next
from vlmjax.testing.tiny_paligemma import make_tiny_paligemma
from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:",
           "the picture : USER: <image> how many red circle are there ? ASSISTANT: the"]
WHOLE = {"whole": Hook()}  # a hook without query_blocks: the whole-pattern path
TOL = dict(rtol=1e-5, atol=1e-6)


class ShapeSpy(Hook):
    """Allows blocks; notes (at trace time) the query rows it sees at attn.pattern."""

    query_blocks = True

    def __call__(self, site, value, ctx):
        if site == "attn.pattern":
            SEEN.append(value.shape[2])
        return value, None


class RecordsAtPattern(Hook):
    query_blocks = True

    def __call__(self, site, value, ctx):
        return (value, value.sum()) if site == "attn.pattern" else (value, None)


SEEN: list = []


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(layers, "QUERY_BLOCK_BYTES", 2048)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return checkpoints(tmp_path_factory, lambda path, variant: make_tiny_llava(path, variant=variant, text_layers=3,
                                                                               vision_layers=2), "gqa")


def _llava_inputs(ckpt):
    ckpt.processor.tokenizer.padding_side = "left"
    return model_inputs(ckpt.processor, PROMPTS, random_images([(50, 70), (60, 40)]))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **TOL)


@pytest.mark.parametrize("variant", ["gqa", "mistral"])
def test_blocked_attention_equals_the_whole_pattern(llava, small_blocks, variant):
    ckpt = llava(variant)
    model, inputs = ckpt.model, _llava_inputs(ckpt)
    n = inputs["input_ids"].shape[1]
    SEEN.clear()
    blocked = model(**inputs, hooks={"spy": ShapeSpy()}, output_hidden_states=True)
    assert SEEN and all(rows < n for rows in SEEN), (SEEN, n)  # every attention of the decoder ran in blocks
    SEEN.clear()
    whole = model(**inputs, hooks={"spy": ShapeSpy(), **WHOLE}, output_hidden_states=True)
    assert set(SEEN) == {n}
    _assert_same((blocked.logits, blocked.hidden_states), (whole.logits, whole.hidden_states))


def test_row_probes_and_attention_interventions_in_blocks(llava, small_blocks):
    ckpt = llava("gqa")
    model, inputs = ckpt.model, _llava_inputs(ckpt)
    meta = model.prepare(inputs)[1]
    num_layers, num_heads = model.num_layers["blocks"], model.config.text.num_heads
    region = np.asarray(meta.mask).copy()
    region[:, : region.shape[1] // 2] = False
    metrics = {"visual": probes.VisualAttention(), "map": probes.LastQueryVisualMap(),
               "heads": probes.VisualHeadAttention(region_mask=jnp.asarray(region))}
    edits = [{"bias": iv.AttentionBias.on_layers(num_layers, layers=[1, 2], bias=1.5)},
             {"block": iv.BlockTextToVisual.on_layers(num_layers, [0, 2])},
             {"remove": iv.RemoveVisualTokens.from_mask(num_layers, np.asarray(meta.mask) & (
                 np.arange(region.shape[1]) % 3 == 0))},
             {"head_mask": iv.HeadMask.heads(num_layers, num_heads, [(0, 1), (2, 3)])}]
    plain = np.asarray(model(**inputs).logits)
    for edit in [{}, *edits]:
        hooks = {**edit, **metrics}
        blocked, whole = model(**inputs, hooks=hooks), model(**inputs, hooks={**hooks, **WHOLE})
        _assert_same((blocked.logits, blocked.hooks), (whole.logits, {k: whole.hooks[k] for k in blocked.hooks}))
        if edit:  # the edit changed the answer's distribution, so the comparison could fail
            assert np.abs(np.asarray(blocked.logits) - plain).max() > 1e-3, edit


FAMILIES = {  # family: (builder, variant, prompts, image sizes)
    "qwen2_vl": (make_tiny_qwen2_vl, "gqa", [f"USER: {IMAGE_PROMPT} what is in the image ?",
                                            f"USER: {IMAGE_PROMPT} how many red circle are there ? ASSISTANT:"],
                 [(56, 112), (56, 56)]),
    "paligemma": (make_tiny_paligemma, "gemma2", ["<image>what is in the image ?", "<image>is there a red circle ?"],
                  [(40, 30)] * 2),
    "llava_next": (make_tiny_llava_next, "vicuna", PROMPTS, [(20, 70), (60, 40)]),
    "instructblip": (lambda path, variant: make_tiny_instructblip(path), "instructblip",
                     ["USER: what is in the image ? ASSISTANT:", "USER: how many red circle are there ? ASSISTANT:"],
                     [(40, 60), (60, 60)]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_in_blocks(tmp_path_factory, small_blocks, family):
    """Qwen2-VL's block-diagonal vision masks and M-RoPE, PaliGemma's prefix-LM mask and soft-capped scores, LLaVA-NeXT's
    anyres tokens, InstructBLIP's Q-Former (whose cross-attention never runs in blocks)."""
    make, variant, prompts, sizes = FAMILIES[family]
    ckpt = checkpoints(tmp_path_factory, make, variant)()
    feed = model_inputs(ckpt.processor, prompts, random_images(sizes))
    hooks = {"visual": probes.VisualAttention(), "map": probes.LastQueryVisualMap()}
    blocked, whole = ckpt.model(**feed, hooks=hooks), ckpt.model(**feed, hooks={**hooks, **WHOLE})
    _assert_same((blocked.logits, blocked.hooks), (whole.logits, {k: whole.hooks[k] for k in blocked.hooks}))


def test_a_pattern_capture_sees_the_whole_pattern_and_false_claims_are_refused(llava, small_blocks):
    ckpt = llava("gqa")
    model, inputs = ckpt.model, _llava_inputs(ckpt)
    n = inputs["input_ids"].shape[1]
    captured = model(**inputs, hooks={"pattern": Capture(sites=frozenset({"attn.pattern"}))})
    assert captured.hooks["pattern"]["attn.pattern"].shape[-2:] == (n, n)
    with pytest.raises(VlmJaxError, match="records at attn.pattern"):
        model(**inputs, hooks={"bad": RecordsAtPattern()})
