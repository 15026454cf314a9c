"""DoLa decoding against an independent NumPy computation on the HF model's hidden states."""

import numpy as np
import pytest
import torch
from PIL import Image

import vlmjax
from vlmjax import generate as gen
from vlmjax.errors import VlmJaxError
from vlmjax.verify import load_hf_model
from vlmjax.testing.tiny import make_tiny_llava

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:",
           "USER: <image> how many red circle are there in the box on the left ? ASSISTANT: the"]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_dola(hidden, logits, norm_weight, eps, lm_head, candidates):
    """Premature layer and contrast scores of one position from HF's hidden_states ([L + 1] arrays [B, D]),
    following the paper: JSD of early-exit distributions, log q_N - log q_M, cut below 0.1 max q_N."""
    log_final = _log_softmax(logits.astype(np.float64))
    jsd, log_early = [], []
    for layer in candidates:
        h = hidden[layer + 1].astype(np.float64)  # hidden_states[l + 1] is block l's output
        normed = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + eps) * norm_weight
        log_q = _log_softmax(normed @ lm_head.T)
        p, q = np.exp(log_final), np.exp(log_q)
        m = (p + q) / 2
        jsd.append(0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1))
        log_early.append(log_q)
    chosen = np.argmax(np.stack(jsd), axis=0)
    log_premature = np.stack(log_early)[chosen, np.arange(len(chosen))]
    plausible = np.exp(log_final) >= 0.1 * np.exp(log_final).max(-1, keepdims=True)
    return np.asarray(candidates)[chosen], np.where(plausible, log_final - log_premature, -np.inf)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("dola")
    _, processor = make_tiny_llava(path, variant="gqa", text_layers=5)
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(5)
    images = [Image.fromarray((rng.random((60, 50, 3)) * 255).astype("uint8")) for _ in range(2)]
    inputs = dict(processor(images=images, text=PROMPTS, return_tensors="np", padding=True))
    return path, inputs, vlmjax.load(path, progress=False)


def test_dola_matches_numpy_on_hf_hidden_states(setup):
    path, inputs, model = setup
    candidates, new = [0, 1, 3], 5
    tokens, first, trace = gen.generate(model, inputs, new, dola_layers=candidates, return_first_logits=True,
                                        return_dola=True)
    n = inputs["input_ids"].shape[1]
    mask = np.concatenate([inputs["attention_mask"], np.ones((2, new), int)], axis=1)
    hf = load_hf_model(path)
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(tokens), pixel_values=torch.as_tensor(inputs["pixel_values"]),
                 attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)),
                 output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]
    norm = hf.model.language_model.norm
    lm_head = hf.lm_head.weight.detach().numpy().astype(np.float64)
    chosen_seen = set()
    for step in range(new):
        position = n - 1 + step  # the position whose output predicts new token `step`
        chosen, scores = _numpy_dola([h[:, position] for h in hidden], out.logits[:, position].numpy(),
                                     norm.weight.detach().numpy(), norm.variance_epsilon, lm_head, candidates)
        np.testing.assert_array_equal(trace["premature_layer"][:, step], chosen)
        ours = trace["scores"][:, step]
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(scores))
        np.testing.assert_allclose(ours[np.isfinite(ours)], scores[np.isfinite(scores)], atol=1e-4)
        np.testing.assert_array_equal(tokens[:, n + step], scores.argmax(-1))  # greedy on the contrast
        chosen_seen.update(chosen.tolist())
    np.testing.assert_array_equal(first, trace["scores"][:, 0])
    assert np.isinf(trace["scores"]).any()  # the plausibility cut is exercised (this flat tiny model rarely cuts)
    plain = gen.generate(model, inputs, new)
    assert not np.array_equal(plain, tokens) or len(chosen_seen) > 1  # the contrast is not a no-op here


def test_dola_refuses_bad_layers(setup):
    _, inputs, model = setup
    for layers in ([], [4], [-1]):
        with pytest.raises(VlmJaxError, match="dola_layers"):
            gen.generate(model, inputs, 2, dola_layers=layers)
    with pytest.raises(VlmJaxError, match="return_dola"):
        gen.generate(model, inputs, 2, return_dola=True)
