"""Benchmark: one layer's attention with the `VisualAttention` probe, on the whole pattern and in query blocks of
several sizes (`vlmjax.models.layers.QUERY_BLOCK_BYTES`), at the shape of `attention_profile.py`'s profile.

q, k, v [B, N, H, hd] of random values, the causal mask, 576 visual tokens after 5 text ones: what the decoder's
`layers.attention` runs per layer. Prints the best time of `--repeats` after a warm-up for each block size, and
checks that the probe's records and the mixed values equal the whole pattern's.
Usage: python benchmarks/query_blocks.py [--batch 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.hooks import Context, Hook, SiteRunner
from vlmjax.models import layers
from vlmjax.probes import VisualAttention

HEADS, HEAD_DIM, TOKENS, VISUAL, VISUAL_START = 8, 64, 624, 576, 5
BLOCK_BYTES = (1 << 20, 2 << 20, 4 << 20, 8 << 20)


def attention_fn(batch: int, block_bytes: int | None):
    """A jitted (q, k, v) -> (z, probe record) with blocks of `block_bytes` of scores (None: the whole pattern)."""
    visual = jnp.zeros((batch, TOKENS), bool).at[:, VISUAL_START:VISUAL_START + VISUAL].set(True)
    ctx = Context(stack="blocks", visual_mask=visual, key_padding=jnp.ones((batch, TOKENS), bool),
                  layer=jnp.int32(0))
    mask = layers.additive_mask(layers.causal_allowed(ctx.key_padding, TOKENS), jnp.float32)
    hooks = {"visual": VisualAttention(), **({} if block_bytes else {"whole": Hook()})}

    def run(q, k, v):
        runner = SiteRunner(hooks, ctx)
        z = layers.attention(q, k, v, mask, runner, HEAD_DIM**-0.5)
        return z, runner.records["visual"]["attn.pattern"]

    layers.QUERY_BLOCK_BYTES = block_bytes or layers.QUERY_BLOCK_BYTES
    return jax.jit(run).lower(*[jax.ShapeDtypeStruct((batch, TOKENS, HEADS, HEAD_DIM), jnp.float32)] * 3).compile()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    rng = np.random.default_rng(0)
    qkv = [jnp.asarray(rng.standard_normal((args.batch, TOKENS, HEADS, HEAD_DIM)), jnp.float32) for _ in range(3)]
    default = layers.QUERY_BLOCK_BYTES
    compiled = {size: attention_fn(args.batch, size) for size in (None, *BLOCK_BYTES)}
    layers.QUERY_BLOCK_BYTES = default
    reference = compiled[None](*qkv)
    print(f"batch {args.batch}, {TOKENS} tokens, {HEADS} heads of {HEAD_DIM}; best of {args.repeats} (ms)\n")
    print("| attention | rows per block | ms | max |Δ| z, records against the whole pattern |\n|---|---|---|---|")
    for size, fn in compiled.items():
        out = jax.block_until_ready(fn(*qkv))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*qkv))
            times.append(time.perf_counter() - start)
        diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
        rows = TOKENS
        if size is not None:  # as layers.attention picks them
            rows = max(8, size // (args.batch * HEADS * TOKENS * 4))
            rows = -(-TOKENS // -(-TOKENS // rows))
        name = "whole pattern" if size is None else f"blocks of {size >> 20} MiB"
        print(f"| {name} | {rows} | {min(times) * 1e3:.1f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
