"""Benchmark: vlmjax vs the HF PyTorch way the seeds measure attention, on a LLaVA-1.5-shaped model scaled down.

(a) Per-layer, per-head text-to-visual attention mass over a batch. HF: eager attention, output_attentions=True,
    the mass computed from the returned [B, H, N, N] tensors. vlmjax: the `VisualAttention` probe reduces each
    layer's pattern inside the compiled forward; no logits are computed.
(b) A 16-value VIAR sweep (bias on the visual keys at the layers of the middle third). HF: one pass per value with
    a forward pre-hook adding the bias to the 4D mask's visual columns (what the seed's code does). vlmjax: one
    compiled sweep that runs the vision tower and the layers before the zone once and vmaps the rest.
nnsight (`pip install nnsight`) runs both on the same HF model: the profile saves the patterns from a trace, the
sweep is one trace per value with an intervention on the zone's attention-mask input.

Each measurement runs in its own subprocess (peak RSS is per process). Prints throughput, peak memory, their
ratios, the FLOPs each result needs, and the machine's measured fp32 matmul peak with the fraction achieved.
Usage: python benchmarks/attention_profile.py [--batch 4] [--repeats 3] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = dict(image_size=336, patch_size=14, text_layers=8, text_hidden=512, text_heads=8, text_ffn=1376,
             vocab=32000, vision_hidden=256, vision_layers=4, vision_heads=4, text_tokens=48, sweep_values=16)


def build(path: Path) -> None:
    from vlmjax.testing.tiny import make_tiny_llava

    s = SHAPE
    make_tiny_llava(path, variant="mha", vocab_size=s["vocab"], image_size=s["image_size"], patch_size=s["patch_size"],
                    text_layers=s["text_layers"], vision_layers=s["vision_layers"], overrides=dict(
                        text=dict(hidden_size=s["text_hidden"], intermediate_size=s["text_ffn"],
                                  num_attention_heads=s["text_heads"], num_key_value_heads=s["text_heads"]),
                        vision=dict(hidden_size=s["vision_hidden"], intermediate_size=4 * s["vision_hidden"],
                                    num_attention_heads=s["vision_heads"])))


def make_inputs(batch: int, image_token_id: int, seed: int = 0) -> dict:
    """[BOS, 8 text, 576 image tokens, 40 text]: 576 visual tokens, 48 text tokens per sample."""
    rng = np.random.default_rng(seed)
    n_visual = (SHAPE["image_size"] // SHAPE["patch_size"]) ** 2
    words = lambda n: rng.integers(10, 200, size=(batch, n))
    ids = np.concatenate([np.ones((batch, 1), int), words(7), np.full((batch, n_visual), image_token_id),
                          words(SHAPE["text_tokens"] - 8)], axis=1)
    pixels = rng.normal(size=(batch, 3, SHAPE["image_size"], SHAPE["image_size"])).astype(np.float32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": pixels}


def needed_flops(batch: int, sweep: bool) -> float:
    """Multiply-adds x 2 that the result needs: vision tower (up to the feature layer), projector, decoder layers
    (for the profile, the last layer only up to its attention pattern: q, k and the scores); for the sweep, the
    shared part once, then per value the zone and later layers and one vocabulary row per sample."""
    s = SHAPE
    t = (s["image_size"] // s["patch_size"]) ** 2 + 1
    dv, dt = s["vision_hidden"], s["text_hidden"]
    n = t - 1 + s["text_tokens"]
    vision_layer = 2 * t * (4 * dv * dv + 2 * dv * 4 * dv) + 2 * 2 * t * t * dv
    vision = 2 * t * 3 * 14 * 14 * dv + (s["vision_layers"] - 1) * vision_layer  # feature layer -2
    projector = 2 * (t - 1) * (dv * dt + dt * dt)
    text_layer = 2 * n * (4 * dt * dt + 3 * dt * s["text_ffn"]) + 2 * 2 * n * n * dt
    if not sweep:
        last_layer_pattern = 2 * n * 2 * dt * dt + 2 * n * n * dt
        return batch * (vision + projector + (s["text_layers"] - 1) * text_layer + last_layer_pattern)
    first = s["text_layers"] // 3
    shared = vision + projector + first * text_layer
    per_value = (s["text_layers"] - first) * text_layer + 2 * dt * s["vocab"]
    return batch * (shared + s["sweep_values"] * per_value)


def matmul_peak() -> float:
    """Best fp32 FLOP/s of a square matmul in JAX over a few sizes (the machine's practical peak)."""
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: x @ x)
    best = 0.0
    for n in (1024, 2048, 3072):
        a = jnp.ones((n, n), jnp.float32)
        f(a).block_until_ready()
        best = max(best, 2 * n**3 / min(_timed(lambda: f(a).block_until_ready()) for _ in range(5)))
    return best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_one(kind: str, path: str, batch: int, repeats: int) -> dict:
    """One measurement (in a fresh process): seconds per batch (best of `repeats`, after a warm-up)."""
    zone = range(SHAPE["text_layers"] // 3, 2 * SHAPE["text_layers"] // 3)
    values = np.linspace(0.0, 3.0, SHAPE["sweep_values"], dtype=np.float32)
    if kind.startswith(("hf", "nnsight")):
        import torch

        from vlmjax.verify import load_hf_model

        torch.set_grad_enabled(False)
        model = load_hf_model(path)
        inputs = make_inputs(batch, model.config.image_token_id)
        feed = {k: torch.as_tensor(v) for k, v in inputs.items()}
        visual = feed["input_ids"] == model.config.image_token_id
        text = torch.zeros_like(visual)
        text[:, visual.nonzero()[:, 1].max() + 1:] = True
        layers = model.model.language_model.layers

        def profile():
            out = model(**feed, output_attentions=True)
            masses = []
            for attn in out.attentions:  # [B, H, N, N]
                to_visual = (attn * visual[:, None, None, :]).sum(-1)  # [B, H, N]
                masses.append((to_visual * text[:, None]).sum(-1) / text.sum(-1)[:, None])
            return torch.stack(masses, 1)

        def sweep():
            results = []
            for b in values:
                def add_bias(module, args, kwargs, b=float(b)):
                    mask = kwargs["attention_mask"].clone()
                    mask += b * visual[:, None, None, :].to(mask.dtype)
                    kwargs["attention_mask"] = mask
                    return args, kwargs

                handles = [layers[i].self_attn.register_forward_pre_hook(add_bias, with_kwargs=True) for i in zone]
                results.append(model(**feed, attn_implementation="eager", logits_to_keep=1).logits)
                for h in handles:
                    h.remove()
            return torch.stack(results)

        if kind.startswith("nnsight"):
            fn = nnsight_workloads(model, feed, visual, text, zone, values)[kind.endswith("sweep")]
        else:
            fn = profile if kind == "hf_profile" else sweep
    else:
        import jax
        import jax.numpy as jnp

        import vlmjax
        from vlmjax import interventions as iv
        from vlmjax.probes import VisualAttention
        from vlmjax.sweep import make_sweep

        model = vlmjax.load(path, progress=False)
        inputs = make_inputs(batch, model.config.image_token_id)
        batch_arrays, _ = model.prepare(inputs)
        if kind == "jax_profile":
            run = jax.jit(lambda p, b: model.forward(p, b, {"visual": VisualAttention()}, logits=None)["hooks"])
            fn = lambda: jax.block_until_ready(run(model.params, batch_arrays))
        else:
            flags = jnp.asarray(iv.layer_flags(SHAPE["text_layers"], zone), jnp.float32)
            run = make_sweep(model, lambda v: {"viar": iv.AttentionBias(v * flags)}, first_layer=zone[0],
                             chunk=None if kind == "jax_sweep_vmap" else 1)
            fn = lambda: jax.block_until_ready(run(model.params, batch_arrays, values)["logits"])
    fn()  # warm-up (and compile)
    seconds = min(_timed(fn) for _ in range(repeats))
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def nnsight_workloads(model, feed, visual, text, zone, values):
    """The same two workloads through nnsight on the same HF model: the profile saves each layer's attention
    pattern from a trace (self_attn's second output under eager attention) and reduces it as HF's does; the
    sweep runs one trace per value whose intervention rewrites the zone's attention-mask input."""
    import nnsight
    import torch

    traced = nnsight.NNsight(model)
    layers = traced.model.language_model.layers

    def profile():
        with traced.trace(**feed):
            patterns = nnsight.save([layer.self_attn.output[1] for layer in layers])
        masses = [((a * visual[:, None, None, :]).sum(-1) * text[:, None]).sum(-1) / text.sum(-1)[:, None]
                  for a in patterns]
        return torch.stack(masses, 1)

    def sweep():
        results = []
        for b in values:
            with traced.trace(**feed, logits_to_keep=1):
                for i in zone:
                    args, kwargs = layers[i].self_attn.inputs
                    kwargs["attention_mask"] = kwargs["attention_mask"] + float(b) * visual[:, None, None, :]
                    layers[i].self_attn.inputs = (args, kwargs)
                logits = nnsight.save(traced.output.logits)
            results.append(logits)
        return torch.stack(results)

    return profile, sweep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="append a results section to this markdown file")
    parser.add_argument("--one", nargs=4, metavar=("KIND", "PATH", "BATCH", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        kind, path, batch, repeats = args.one
        print(json.dumps(run_one(kind, path, int(batch), int(repeats))))
        return 0
    path = Path(tempfile.mkdtemp(prefix="vlmjax-bench-"))
    build(path)
    results = {}
    for kind in ("hf_profile", "nnsight_profile", "jax_profile", "hf_sweep", "nnsight_sweep", "jax_sweep",
                 "jax_sweep_vmap"):
        proc = subprocess.run([sys.executable, __file__, "--one", kind, str(path), str(args.batch), str(args.repeats)],
                              capture_output=True, text=True, check=True)
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(kind, results[kind], flush=True)
    peak = matmul_peak()
    lines = [f"Batch {args.batch}; 576 visual + {SHAPE['text_tokens']} text tokens; decoder 8 x {SHAPE['text_hidden']}, "
             f"vocab {SHAPE['vocab']}; vision {SHAPE['vision_layers']} x {SHAPE['vision_hidden']} at 336 px. "
             f"Measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s.", "",
             "| task | impl | s / batch | samples/s | peak RSS MB | needed GFLOP | GFLOP/s | of peak |",
             "|---|---|---|---|---|---|---|---|"]
    for task, sweep in (("profile", False), ("sweep", True)):
        flops = needed_flops(args.batch, sweep)
        for impl in ("hf", "nnsight", "jax"):
            r = results[f"{impl}_{task}"]
            rate = flops / r["seconds"]
            name = {"hf": "HF eager", "nnsight": "nnsight (HF eager)", "jax": "vlmjax"}[impl]
            lines.append(f"| {task} | {name} | {r['seconds']:.3f} | "
                         f"{args.batch / r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {flops / 1e9:.1f} | "
                         f"{rate / 1e9:.1f} | {rate / peak:.0%} |")
        if sweep:
            r = results["jax_sweep_vmap"]
            lines.append(f"| sweep | vlmjax, one vmap | {r['seconds']:.3f} | {args.batch / r['seconds']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} | {flops / 1e9:.1f} | {flops / r['seconds'] / 1e9:.1f} | "
                         f"{flops / r['seconds'] / peak:.0%} |")
        speed = results[f"hf_{task}"]["seconds"] / results[f"jax_{task}"]["seconds"]
        memory = results[f"hf_{task}"]["peak_rss_mb"] / results[f"jax_{task}"]["peak_rss_mb"]
        lines.append(f"| {task} | ratio HF/vlmjax | {speed:.2f}x faster | | {memory:.2f}x less memory | | | |")
        speed = results[f"nnsight_{task}"]["seconds"] / results[f"jax_{task}"]["seconds"]
        memory = results[f"nnsight_{task}"]["peak_rss_mb"] / results[f"jax_{task}"]["peak_rss_mb"]
        lines.append(f"| {task} | ratio nnsight/vlmjax | {speed:.2f}x faster | | {memory:.2f}x less memory | | | |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d')} — {args.batch=}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
