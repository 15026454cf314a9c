"""How large can MixIG be? The range of the stated TME formula against the paper's Table 1 (docs/methods.md §3).

`python benchmarks/mixig_range.py [--images 8]` prints (a) the bounds of TME under the stated formula
(`P_tj ∝ (x~_t . x~_j + 1) / 2`, entropy in nats): identical tokens, two antipodal clusters, and the minimum found
by gradient descent on `vlmjax.metrics.geometry.token_mixing_entropy`; (b) MixIG of random Gaussian updates; (c)
MixIG of the built-in LLaVA's real attention and MLP updates and of its Noise-Δ and Noise-QKV updates (all layers,
shapes-world images), under the stated formula and under other normalisations: bits, TME divided by log S, tokens
centred before the cosines, a softmax kernel `P_tj ∝ exp(cos_tj / tau)`, and TME of the update dX itself
against TME(X).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

jax.config.update("jax_default_matmul_precision", "highest")

from vlmjax.metrics.geometry import mix_ig, token_mixing_entropy  # noqa: E402

PAPER = {"attention": 0.61, "mlp": 0.02, "noise_delta": -0.80, "noise_qkv": -0.50}


def softmax_tme(x, tau):
    """TME with a softmax kernel over cosines, P_tj ∝ exp(cos_tj / tau), in nats."""
    unit = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    log_p = jax.nn.log_softmax(unit @ unit.T / tau, axis=1)
    return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=1))


NORMALISATIONS = {
    "stated (nats)": lambda new, old: mix_ig(new, old),
    "bits": lambda new, old: mix_ig(new, old) / jnp.log(2.0),
    "TME / log S": lambda new, old: mix_ig(new, old) / jnp.log(new.shape[0]),
    "centred tokens": lambda new, old: mix_ig(new - new.mean(0), old - old.mean(0)),
    "softmax tau=0.1": lambda new, old: softmax_tme(new, 0.1) - softmax_tme(old, 0.1),
    "softmax tau=0.05": lambda new, old: softmax_tme(new, 0.05) - softmax_tme(old, 0.05),
    "on dX (stated)": lambda new, old: token_mixing_entropy(new - old) - token_mixing_entropy(old),
    "on dX, tau=0.1": lambda new, old: softmax_tme(new - old, 0.1) - softmax_tme(old, 0.1),
}


def bounds():
    print("(a) TME - log S under the stated formula (the maximum, log S, is reached by identical tokens)")
    for s, d in ((8, 8), (32, 16), (128, 64)):
        v = jax.random.normal(jax.random.key(0), (d,))
        antipodal = jnp.stack([v if i % 2 else -v for i in range(s)])
        grad = jax.jit(jax.value_and_grad(token_mixing_entropy))
        lowest = np.inf
        for seed in range(3):
            x = jax.random.normal(jax.random.key(seed + 1), (s, d))
            opt = optax.adam(0.05)
            state = opt.init(x)
            for _ in range(1500):
                _, g = grad(x)
                update, state = opt.update(g, state)
                x = optax.apply_updates(x, update)
            lowest = min(lowest, float(token_mixing_entropy(x)))
        print(f"  S={s:4d} D={d:3d}: identical {float(token_mixing_entropy(jnp.ones((s, d)))) - np.log(s):+.4f}  "
              f"two antipodal clusters {float(token_mixing_entropy(antipodal)) - np.log(s):+.4f}  "
              f"gradient-descent minimum {lowest - np.log(s):+.4f}   (-log 2 = {-np.log(2):+.4f})")


def random_updates():
    print("(b) MixIG (stated) of X' = X + c N(0, 1) on Gaussian X [S=576, D=1024], and of an anisotropic X "
          "(a shared direction 3x the rest)")
    x = jax.random.normal(jax.random.key(1), (576, 1024))
    shared = 3.0 * jax.random.normal(jax.random.key(2), (1, 1024))
    noise = jax.random.normal(jax.random.key(3), x.shape)
    for c in (0.1, 1.0, 10.0):
        print(f"  c={c:5.1f}: isotropic {float(mix_ig(x + c * noise, x)):+.4f}   "
              f"anisotropic {float(mix_ig(x + shared + c * noise, x + shared)):+.4f}")


def model_updates(n_images: int):
    from transformers import AutoProcessor

    import vlmjax
    from vlmjax import interventions as iv
    from vlmjax.builtin import builtin_path
    from vlmjax.data.shapes import generate_scenes
    from vlmjax.hooks import Capture

    model = vlmjax.load("builtin:llava-shapes", progress=False)
    processor = AutoProcessor.from_pretrained(builtin_path("llava-shapes"))
    images = [image for image, _ in generate_scenes(n_images, 11, 64, progress=False)]
    inputs = dict(processor(images=images, text=["USER: <image> Is there a red circle in the image? ASSISTANT:"]
                            * n_images, return_tensors="np"))
    layers = model.num_layers["blocks"]
    capture = {"c": Capture(sites=frozenset({"resid_pre", "resid_mid", "resid_post"}))}
    runs = {"plain": {}, "noise_delta": {"n": iv.NoiseAttentionOutput.on_layers(layers, jax.random.key(0))},
            "noise_qkv": {"n": iv.NoiseQKV.from_params(model.params["text"], jax.random.key(0))}}
    pairs = {}
    for name, hooks in runs.items():
        c = model(**inputs, hooks={**hooks, **capture}, logits=None).hooks["c"]
        attention = [(c["resid_mid"][l, b], c["resid_pre"][l, b]) for l in range(layers) for b in range(n_images)]
        if name == "plain":
            pairs["attention"] = attention
            pairs["mlp"] = [(c["resid_post"][l, b], c["resid_mid"][l, b]) for l in range(layers)
                            for b in range(n_images)]
        else:
            pairs[name] = attention
    s = inputs["input_ids"].shape[1]
    print(f"(c) the built-in LLaVA, {n_images} images x {layers} layers, S={s} tokens: mean MixIG (paper's Table 1)")
    print("  " + f"{'normalisation':18s}" + "".join(f"{k:>22s}" for k in PAPER))
    print("  " + f"{'paper':18s}" + "".join(f"{v:>22.2f}" for v in PAPER.values()))
    for label, fn in NORMALISATIONS.items():
        fn = jax.jit(fn)
        cells = []
        for kind in PAPER:
            values = np.array([float(fn(jnp.asarray(new), jnp.asarray(old))) for new, old in pairs[kind]])
            cells.append(f"{values.mean():+.3f} [{values.min():+.2f},{values.max():+.2f}]")
        print("  " + f"{label:18s}" + "".join(f"{c:>22s}" for c in cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args(argv)
    bounds()
    random_updates()
    model_updates(args.images)


if __name__ == "__main__":
    main()
