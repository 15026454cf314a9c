"""Self-consistency: agreement rate by hand, and sampling that is seeded and within range."""

import jax
import numpy as np
import pytest
from PIL import Image

from vlmjax import load
from vlmjax.errors import VlmJaxError
from vlmjax.eval.consistency import agreement_rate, self_consistency
from vlmjax.eval.pope import parse_yes_no
from vlmjax.testing.tiny import make_tiny_llava


def test_agreement_rate_by_hand():
    assert agreement_rate(["yes", "Yes.", "no", "the yes"]) == ("yes", 0.75)
    assert agreement_rate(["two", "2", "3"]) == ("2", pytest.approx(2 / 3))
    assert agreement_rate(["red", "blue"]) == ("red", 0.5)  # a tie: the first seen
    assert agreement_rate(["Yes, there is", "No.", "not at all"], parse_yes_no) == ("no", pytest.approx(2 / 3))
    with pytest.raises(VlmJaxError, match="at least one"):
        agreement_rate([])


def test_self_consistency_is_seeded_and_in_range(tmp_path):
    _, processor = make_tiny_llava(tmp_path, variant="gqa")
    model = load(tmp_path, progress=False)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((56, 56, 3)) * 255).astype("uint8")) for _ in range(3)]
    questions = ["what is in the image ?", "how many red circle are there ?", "what colour is the square ?"]
    run = lambda seed: self_consistency(model, processor, images, questions, jax.random.key(seed), k=6,
                                        max_new_tokens=3, batch_size=2)
    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert [r["samples"] for r in first] != [r["samples"] for r in other]
    for r in first:
        assert len(r["samples"]) == 6 and 1 / 6 <= r["agreement"] <= 1
        assert agreement_rate(r["samples"]) == (r["majority"], r["agreement"])
    assert min(r["agreement"] for r in first) < 1  # a random model at T = 0.7 disagrees with itself
