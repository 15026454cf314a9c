"""KV-cache decoding: greedy equals HF generate token for token; sampling is seeded; one compile per shape."""

import jax
import torch
import numpy as np
import pytest
from PIL import Image

import vlmjax
from vlmjax import generate as gen
from vlmjax.errors import VlmJaxError
from vlmjax.verify import load_hf_model
from vlmjax.testing.tiny import make_tiny_llava

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:",
           "USER: <image> how many red circle are there in the box on the left ? yes or no ? ASSISTANT: the"]


@pytest.fixture(scope="module", params=["gqa", "mistral"])
def setup(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    _, processor = make_tiny_llava(path, variant=request.param)
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((70, 50, 3)) * 255).astype("uint8")) for _ in range(2)]
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    return path, inputs, vlmjax.load(path, progress=False)


def test_greedy_matches_hf_generate(setup):
    path, inputs, model = setup
    new = 24  # the Mistral variant's window is 16: decoding crosses it
    ref = load_hf_model(path).generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=2,
                                       pad_token_id=3).numpy()
    ours = gen.generate(model, {k: v.numpy() for k, v in inputs.items()}, max_new_tokens=new, eos_token_id=2,
                        pad_token_id=3)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == 3).all()  # HF stops once every row has ended; the rest is padding


def test_sampling_is_seeded_and_respects_top_p(setup):
    _, inputs, model = setup
    feed = {k: v.numpy() for k, v in inputs.items()}
    a = gen.generate(model, feed, 8, do_sample=True, temperature=0.7, top_p=0.9, key=jax.random.key(3))
    b = gen.generate(model, feed, 8, do_sample=True, temperature=0.7, top_p=0.9, key=jax.random.key(3))
    c = gen.generate(model, feed, 8, do_sample=True, temperature=0.7, top_p=0.9, key=jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    logits = jax.numpy.asarray([[0.0, 5.0, 4.9, -3.0]])
    # probabilities ~[0.003, 0.523, 0.473, 0.0002]: HF removes, in ascending order, tokens whose cumulative
    # probability is <= 1 - top_p, so top_p 0.5 keeps token 1 alone and top_p 0.6 keeps tokens 1 and 2.
    for top_p, kept in ((0.5, {1}), (0.6, {1, 2})):
        picks = {int(gen._next_token(logits, jax.random.key(i), True, 1.0, top_p)[0]) for i in range(60)}
        assert picks == kept
    with pytest.raises(VlmJaxError, match="explicit PRNG key"):
        gen.generate(model, feed, 4, do_sample=True)


def test_one_compile_for_new_prompts_of_the_same_shape(setup):
    _, inputs, model = setup
    feed = {k: v.numpy() for k, v in inputs.items()}
    gen.generate(model, feed, 6)
    before = gen._generate.compiled(model)._cache_size()
    other = dict(feed, pixel_values=feed["pixel_values"][::-1].copy())
    gen.generate(model, other, 6)
    assert gen._generate.compiled(model)._cache_size() == before


def test_vcd_contrastive_decoding(setup):
    _, inputs, model = setup
    feed = {k: v.numpy() for k, v in inputs.items()}
    real = np.array([[2.0, 1.0, -5.0, 0.5]])
    dist = np.array([[1.0, 3.0, -1.0, 0.0]])
    expected = np.array([[3.0, -1.0, -np.inf, 1.0]])  # 2 l - l', token 2 below log(0.1) + 2 is cut
    np.testing.assert_allclose(np.asarray(gen.contrastive_logits(real, dist, 1.0, 0.1)), expected)
    # With the distorted stream equal to the real one, contrast leaves the greedy choice unchanged.
    plain = gen.generate(model, feed, 6)
    same = gen.generate(model, feed, 6, contrast_pixel_values=feed["pixel_values"])
    np.testing.assert_array_equal(plain, same)
    # The first step's contrasted logits are the formula applied to the two streams run separately.
    noisy = feed["pixel_values"] + np.random.default_rng(0).normal(size=feed["pixel_values"].shape).astype(np.float32)
    _, first = gen.generate(model, feed, 2, contrast_pixel_values=noisy, alpha=0.5, beta=0.2,
                            return_first_logits=True)
    batch = dict(feed, position_ids=model.module.decode_start(model.prepare(feed)[0])[0]["position_ids"])
    l_real = np.asarray(model(**batch, logits="last").logits[:, -1])
    l_dist = np.asarray(model(**dict(batch, pixel_values=noisy), logits="last").logits[:, -1])
    want = np.asarray(gen.contrastive_logits(l_real, l_dist, 0.5, 0.2))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(finite, np.isfinite(first))
    np.testing.assert_allclose(first[finite], want[finite], atol=1e-4)


def _hf_greedy(path, inputs, new):
    return load_hf_model(path).generate(**{k: torch.as_tensor(v) for k, v in inputs.items()}, max_new_tokens=new,
                                        do_sample=False, eos_token_id=2, pad_token_id=3).numpy()


def test_greedy_matches_hf_for_llava_next_and_qwen2_vl(tmp_path):
    """The other families decode through their own positions: LLaVA-NeXT's anyres prompt, Qwen2-VL's M-RoPE
    (the step position is the absolute index plus rope_deltas, the three axes together)."""
    from vlmjax.testing.tiny_llava_next import make_tiny_llava_next
    from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl

    rng = np.random.default_rng(2)
    pictures = [Image.fromarray((rng.random(s) * 255).astype("uint8")) for s in ((40, 70, 3), (56, 28, 3))]
    _, next_processor = make_tiny_llava_next(tmp_path / "next", variant="mistral")
    _, qwen_processor = make_tiny_qwen2_vl(tmp_path / "qwen", variant="gqa")
    qwen_image = "<|vision_start|><|image_pad|><|vision_end|>"
    cases = [(tmp_path / "next", next_processor, PROMPTS),
             (tmp_path / "qwen", qwen_processor, [p.replace("<image>", qwen_image) for p in PROMPTS])]
    for path, processor, prompts in cases:
        processor.tokenizer.padding_side = "left"
        inputs = dict(processor(images=pictures, text=prompts, return_tensors="np", padding=True))
        ref = _hf_greedy(path, inputs, 10)
        ours = gen.generate(vlmjax.load(path, progress=False), inputs, 10, eos_token_id=2, pad_token_id=3)
        np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)


def test_interventions_apply_while_decoding(setup):
    """Hooks run in prefill and in every step (keys span the cache there): a zero VIAR bias changes nothing, a
    real one changes the first step exactly as in a plain forward with the same hook."""
    from vlmjax import interventions as iv

    _, inputs, model = setup
    feed = {k: v.numpy() for k, v in inputs.items()}
    layers = model.config.text.num_layers
    plain = gen.generate(model, feed, 6)
    zero = gen.generate(model, feed, 6, hooks={"viar": iv.AttentionBias.on_layers(layers, [1], bias=0.0)})
    np.testing.assert_array_equal(plain, zero)
    viar = {"viar": iv.AttentionBias.on_layers(layers, [1, 2], bias=4.0)}
    tokens, first = gen.generate(model, feed, 6, hooks=viar, return_first_logits=True)
    batch = dict(feed, position_ids=model.module.decode_start(model.prepare(feed)[0])[0]["position_ids"])
    want = np.asarray(model(**batch, hooks=viar, logits="last").logits[:, -1])
    np.testing.assert_allclose(first, want, atol=1e-5)
    assert not np.allclose(first, np.asarray(model(**batch, logits="last").logits[:, -1]), atol=1e-3)
    n = feed["input_ids"].shape[1]
    for step in range(1, 4):  # each cached step equals a full forward over the prompt and the tokens so far
        grown = dict(feed, input_ids=tokens[:, : n + step],
                     attention_mask=np.concatenate([feed["attention_mask"], np.ones((2, step), int)], axis=1))
        grown["position_ids"] = model.module.decode_start(model.prepare(grown)[0])[0]["position_ids"]
        full = np.asarray(model(**grown, hooks=viar, logits="last").logits[:, -1])
        np.testing.assert_array_equal(full.argmax(-1), tokens[:, n + step])
