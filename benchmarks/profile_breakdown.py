"""Where the time of `attention_profile.py`'s vlmjax profile goes, by component, on its built model and batch.

Each component is jitted on its own and timed (best of `--repeats` after a warm-up): the whole profile (the
`VisualAttention` probe, no logits), the vision tower to its feature layer, the projector, the decoder layers
with the probe, and one decoder layer split into its matmul work (q, k, v, o, gate, up, down) and its attention
work (`layers.attention`: scores, mask, softmax, pattern @ v; in query blocks, and on the whole pattern as a hook
that does not allow blocks gets it), on layer 0's weights and input. The FLOPs of each follow
`attention_profile.needed_flops`. Usage:
python benchmarks/profile_breakdown.py MODEL_DIR [--batch 4] [--repeats 3]
(MODEL_DIR as built by `attention_profile.build`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
import attention_profile as ap  # noqa: E402

import vlmjax  # noqa: E402
from vlmjax.hooks import Context, Hook, SiteRunner  # noqa: E402
from vlmjax.models import vlm  # noqa: E402
from vlmjax.models.layers import attention  # noqa: E402
from vlmjax.probes import VisualAttention  # noqa: E402


def best_seconds(fn, args, repeats: int) -> float:
    run = jax.jit(fn)
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def component_flops(batch: int) -> dict[str, float]:
    s = ap.SHAPE
    t = (s["image_size"] // s["patch_size"]) ** 2 + 1
    dv, dt, f = s["vision_hidden"], s["text_hidden"], s["text_ffn"]
    n = t - 1 + s["text_tokens"]
    vision_layer = 2 * t * (4 * dv * dv + 2 * dv * 4 * dv) + 2 * 2 * t * t * dv
    layer_matmuls = 2 * n * (4 * dt * dt + 3 * dt * f)
    layer_attention = 2 * 2 * n * n * dt
    last_layer_pattern = 2 * n * 2 * dt * dt + 2 * n * n * dt
    return {k: batch * v for k, v in dict(
        profile=ap.needed_flops(1, sweep=False),
        vision=2 * t * 3 * 14 * 14 * dv + (s["vision_layers"] - 1) * vision_layer,
        projector=2 * (t - 1) * (dv * dt + dt * dt),
        decoder=(s["text_layers"] - 1) * (layer_matmuls + layer_attention) + last_layer_pattern,
        layer_matmuls=layer_matmuls, layer_attention=layer_attention, layer_attention_whole=layer_attention).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    model = vlmjax.load(args.model, progress=False)
    cfg = model.config
    batch, _ = model.prepare(ap.make_inputs(args.batch, cfg.image_token_id))
    params = model.params
    probe = {"visual": VisualAttention()}
    no_site = SiteRunner({}, Context(stack=""))

    def vision(p, pixels):
        states, _ = vlm.bind(cfg, p).vision.hidden_states_at(pixels, cfg.vision_feature_layers, {}, no_site)
        return jnp.concatenate([s[:, 1:] for s in states], axis=-1)

    features = jax.jit(vision)(params, batch["pixel_values"])
    resid = jax.jit(lambda p, b: model.forward(p, b, stop_layer=0)["resid"])(params, batch)
    layer0 = jax.tree.map(lambda a: a[0], params["text"]["layers"])
    h = resid
    b, n, d = h.shape
    heads = cfg.text.num_heads
    mask = jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, jnp.finfo(jnp.float32).min)[None, None]

    def layer_matmuls(w, x):
        q, k, v = (x @ w[name]["kernel"] for name in ("q", "k", "v"))
        x = x + (q + k + v) @ w["o"]["kernel"]
        return x + (jax.nn.silu(x @ w["gate"]["kernel"]) * (x @ w["up"]["kernel"])) @ w["down"]["kernel"]

    def layer_attention(x, hooks):
        q = k = v = x.reshape(b, n, heads, d // heads)
        return attention(q, k, v, mask, SiteRunner(hooks, Context(stack="blocks")), (d // heads) ** -0.5)

    timings = {
        "profile": best_seconds(lambda p, bt: model.forward(p, bt, probe, logits=None)["hooks"], (params, batch),
                                args.repeats),
        "vision": best_seconds(vision, (params, batch["pixel_values"]), args.repeats),
        "projector": best_seconds(lambda p, f: vlm.bind(cfg, p).projector(f), (params, features), args.repeats),
        "decoder": best_seconds(lambda p, bt, r: model.forward(p, bt, probe, logits=None, resid=r)["hooks"],
                                (params, batch, resid), args.repeats),
        "layer_matmuls": best_seconds(layer_matmuls, (layer0, h), args.repeats),
        "layer_attention": best_seconds(lambda x: layer_attention(x, {}), (h,), args.repeats),
        "layer_attention_whole": best_seconds(lambda x: layer_attention(x, {"whole": Hook()}), (h,), args.repeats),
    }
    flops = component_flops(args.batch)
    peak = ap.matmul_peak()
    print(f"batch {args.batch}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| component | s / batch | GFLOP | GFLOP/s | of peak |\n|---|---|---|---|---|")
    for name, seconds in timings.items():
        rate = flops[name] / seconds
        print(f"| {name} | {seconds:.4f} | {flops[name] / 1e9:.2f} | {rate / 1e9:.1f} | {rate / peak:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
