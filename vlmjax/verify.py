"""`vlmjax verify`: the HF PyTorch reference, run on the same inputs as vlmjax, and a per-layer comparison of the two.

`verify(path)` is the check a user runs on their own checkpoint; the parity tests use the reference and `compare`
directly. Needs torch (the `reference` extra). The reference runs in fp32 with eager attention so attention
probabilities exist.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vlmjax.errors import VlmJaxError

EXAMPLE_SIZES = ((80, 60), (48, 96), (64, 64))  # (height, width) of the example images


def example_inputs(path, num_images: int = 2, seed: int = 0):
    """(processor, processor outputs) for a left-padded batch of `num_images` prompts, each with one random image."""
    from PIL import Image

    from vlmjax.inputs import image_placeholder
    from vlmjax.processors import load_processor

    processor = load_processor(path)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray((rng.random((*EXAMPLE_SIZES[i % 3], 3)) * 255).astype("uint8"))
              for i in range(num_images)]
    token = image_placeholder(processor)
    texts = [f"USER: {token} what is in the image ? ASSISTANT:",
             f"USER: {token} how many red circle are there in the box ? yes or no ? ASSISTANT: the"][:num_images]
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"
    return processor, dict(processor(images=images, text=texts, return_tensors="np", padding=True))


def load_hf_model(path, dtype: str = "float32"):
    try:
        import torch
        from transformers import AutoModelForImageTextToText
    except ImportError as e:  # pragma: no cover - depends on the install
        raise VlmJaxError("The HF reference needs torch: pip install 'vlmjax[reference]'.") from e
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                        attn_implementation="eager")
    return model.eval()


def run_hf(model, inputs: dict) -> dict:
    """logits, hidden_states, attentions (numpy, fp32) of the HF model on `inputs` (processor outputs)."""
    import torch

    feed = {k: (torch.as_tensor(np.asarray(v)) if not hasattr(v, "detach") else v) for k, v in inputs.items()}
    if "pixel_values" in feed:
        feed["pixel_values"] = feed["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model(**feed, output_hidden_states=True, output_attentions=True)
    f = lambda t: t.float().numpy()
    text = getattr(out, "language_model_outputs", None) or out  # InstructBLIP nests its decoder's outputs
    return {"logits": f(out.logits), "hidden_states": [f(h) for h in text.hidden_states],
            "attentions": [f(a) for a in text.attentions]}


@dataclasses.dataclass
class Comparison:
    logits: float
    hidden_states: list[float]
    attentions: list[float]

    @property
    def worst(self) -> float:
        return max([self.logits, *self.hidden_states, *self.attentions])

    def table(self) -> str:
        rows = [f"{'layer':>6} {'hidden max|Δ|':>15} {'attention max|Δ|':>17}"]
        for i, h in enumerate(self.hidden_states):
            a = self.attentions[i - 1] if 0 < i <= len(self.attentions) else None
            label = "embed" if i == 0 else str(i - 1)
            rows.append(f"{label:>6} {h:>15.3e} {'' if a is None else f'{a:>17.3e}'}")
        rows.append(f"{'logits':>6} {self.logits:>15.3e}")
        return "\n".join(rows)


def _max_abs(a, b, valid=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise VlmJaxError(f"Shapes differ between vlmjax {a.shape} and HF {b.shape}.")
    d = np.abs(a - b)
    if valid is not None:
        d = d[valid]
    return float(d.max()) if d.size else 0.0


def compare(ours: dict, theirs: dict, attention_mask=None) -> Comparison:
    """max |Δ| per layer. With `attention_mask`, positions that are padding are left out of hidden states and
    logits, and padded query rows out of attention (their values are defined by convention only)."""
    valid = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
    rows = None if valid is None else valid[:, None, :, None] & np.ones((1, 1, 1, 1), bool)
    hidden = [_max_abs(o, t, valid) for o, t in zip(ours["hidden_states"], theirs["hidden_states"], strict=True)]
    attn = []
    for o, t in zip(ours["attentions"], theirs["attentions"], strict=True):
        sel = None if rows is None else np.broadcast_to(rows, np.shape(o))
        attn.append(_max_abs(o, t, sel))
    return Comparison(_max_abs(ours["logits"], theirs["logits"], valid), hidden, attn)


def verify(path) -> tuple[Comparison, dict]:
    """(per-layer comparison, the inputs used): vlmjax and the HF model of the checkpoint at `path`, both in fp32, on
    a padded batch of two prompts built by its processor."""
    import vlmjax

    _, inputs = example_inputs(path)
    model = vlmjax.load(path, dtype="float32", progress=False)
    ours = model(**inputs, output_hidden_states=True, output_attentions=True)
    return compare(ours, run_hf(load_hf_model(path), inputs)), inputs
