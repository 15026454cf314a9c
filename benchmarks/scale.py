"""Benchmark: a LLaVA-1.5-7B-shaped checkpoint (random bf16 weights) loaded straight into one device or a mesh.

Writes an HF LLaVA checkpoint directory with LLaVA-1.5-7B's shapes (decoder 32 x 4096, 32 heads, MLP 11008,
vocabulary 32064; CLIP ViT-L/14 at 336 px, 24 layers of 1024) as bf16 safetensors shards, tensor by tensor and in
chunks (the model is never in memory), then measures, each in its own process (peak RSS = that process's):
(a) `vlmjax.load` to one device in bf16: peak RSS against the checkpoint's bytes;
(b) `vlmjax.load` into a (data 2, model 4) mesh of 8 simulated devices: bytes per device and peak RSS;
(c) one forward on one image + a 40-token question (616 tokens) with the `VisualAttention` probe, sharded and on
    one device: finite, the same within bf16 tolerance, and its time;
(d) `vlmjax convert` to bf16: peak RSS.
`--layers N --vision-layers N` (and --width etc.) scale it down, `--kinds` picks the measurements. The full shape
needs ~14 GB of disk and ~16.5 GiB of memory for (a), (b) with FSDP_RULES and (d); (b) with DEFAULT_RULES holds
the model twice in one process of 8 simulated devices, and (c) on XLA:CPU holds f32 copies of the stacked layer
weights (benchmarks/RESULTS.md). Usage: python benchmarks/scale.py --layers 2 --vision-layers 2 [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LLAVA_7B = dict(layers=32, width=4096, heads=32, mlp=11008, vocab=32064, vision_layers=24)
IMAGE_TOKEN_ID = 32000
NUM_TOKENS, NUM_VISUAL = 616, 576  # one 336 px image (24 x 24 patches) and a 40-token question
CHUNK = 1 << 24  # elements written at a time
KINDS = ("load", "mesh", "fsdp", "convert")


def hf_config(layers, width, heads, mlp, vocab, vision_layers):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def hf_tensors(config) -> list[tuple[str, tuple]]:
    """(HF key, HF shape) of every tensor of the model, from vlmjax's key table and shapes."""
    from converters.hf import _stacked, expected_shapes, model_module
    from converters.keymaps import KeyMap
    from vlmjax import models

    cfg = models.from_hf(config)
    module = model_module(cfg)
    keymap = KeyMap(module.KEY_ROWS, cfg)
    out = []
    for p, shape in expected_shapes(cfg).items():
        for key, layer, transform in keymap.hf_keys(p, shape[0] if _stacked(p) else None):
            ours = shape[1:] if layer is not None else shape
            hf = ours[::-1] if transform == "linear" else module.conv_kernel_shape(cfg) if transform == "conv" else ours
            out.append((key, tuple(hf)))
    return sorted(out)


def _random_chunks(key: str, shape: tuple, rng, pool: np.ndarray):
    """bf16 bytes in chunks: norms' scales near 1, everything else windows at random offsets of `pool`, a block
    of N(0, 0.02) values (HF's initialiser range) drawn once, so that writing runs at disk speed."""
    import ml_dtypes

    n = int(np.prod(shape))
    if "norm" in key and key.endswith(".weight"):
        yield (1 + 0.02 * rng.standard_normal(n, np.float32)).astype(ml_dtypes.bfloat16).tobytes()
        return
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        offset = int(rng.integers(0, len(pool) - size + 1))
        yield pool[offset:offset + size].tobytes()


def random_pool(rng, size: int = 4 * CHUNK) -> np.ndarray:
    import ml_dtypes

    return (0.02 * rng.standard_normal(size, np.float32)).astype(ml_dtypes.bfloat16)


def write_safetensors(file: Path, tensors: list[tuple[str, tuple]], rng, pool: np.ndarray) -> int:
    """A bf16 safetensors file written tensor by tensor (header first, from the shapes alone); its byte size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in tensors:
        size = 2 * int(np.prod(shape))
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key, shape in tensors:
            for chunk in _random_chunks(key, shape, rng, pool):
                f.write(chunk)
    return offset


def write_checkpoint(out: str | Path, shard_bytes: int = 2 << 30, seed: int = 0, **shape) -> int:
    """An HF LLaVA checkpoint directory of random bf16 weights (sharded with an index); its tensor bytes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(**{**LLAVA_7B, **shape})
    config.save_pretrained(str(out))
    shards, current, size = [], [], 0
    for key, hf_shape in hf_tensors(config):
        nbytes = 2 * int(np.prod(hf_shape))
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, hf_shape))
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(seed)
    pool = random_pool(rng)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out / name, shard, rng, pool)
        weight_map.update({key: name for key, _ in shard})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def question_inputs(seed: int = 0) -> dict:
    """One 336 px image and 616 tokens: BOS, 4 words, the 576 image tokens, 35 words (a 40-token question)."""
    rng = np.random.default_rng(seed)
    words = lambda n: rng.integers(10, 30000, size=(1, n))
    ids = np.concatenate([np.ones((1, 1), int), words(4), np.full((1, NUM_VISUAL), IMAGE_TOKEN_ID),
                          words(NUM_TOKENS - NUM_VISUAL - 5)], axis=1)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "pixel_values": rng.normal(size=(1, 3, 336, 336)).astype(np.float32)}


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM: unlike getrusage's ru_maxrss, it does not inherit the parent's peak
    across fork and exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def measure(kind: str, path: str, save: str, forwards: int = 2) -> dict:
    """One measurement in this (fresh) process. kind: "load" (one device), "mesh" (8 devices, data 2 x model 4,
    DEFAULT_RULES), "fsdp" (the same mesh, FSDP_RULES), "convert". The loads then run the probed forward
    `forwards` times (the first compiles) and save its records to `save`."""
    import jax

    import vlmjax
    from converters import hf
    from vlmjax.probes import VisualAttention
    from vlmjax.sharding import DEFAULT_RULES, FSDP_RULES, make_mesh

    hf.read_hf_config(path)  # imports transformers: part of the baseline
    jax.devices()
    baseline = _peak_mb()
    if kind == "convert":
        from vlmjax.cli import main

        start = time.perf_counter()
        assert main(["convert", path, save, "--dtype", "bfloat16"]) == 0
        return {"baseline_mb": baseline, "peak_mb": _peak_mb(), "seconds": time.perf_counter() - start}
    mesh = None if kind == "load" else make_mesh(data=2, model=4)
    rules = {"load": None, "mesh": DEFAULT_RULES, "fsdp": FSDP_RULES}[kind]
    start = time.perf_counter()
    model = vlmjax.load(path, dtype="bfloat16", mesh=mesh, rules=rules, progress=False)
    jax.block_until_ready(model.params)
    result = {"baseline_mb": baseline, "peak_mb": _peak_mb(), "load_seconds": time.perf_counter() - start}
    per_device: dict = {}
    for leaf in jax.tree.leaves(model.params):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    result["bytes_per_device"] = per_device
    result["replicated_bytes"] = sum(x.nbytes for x in jax.tree.leaves(model.params) if x.sharding.is_fully_replicated)
    if not forwards:
        return result
    inputs, hooks = question_inputs(), {"visual": VisualAttention()}
    times = []
    for _ in range(forwards):  # the first call compiles
        start = time.perf_counter()
        out = model(**inputs, hooks=hooks, logits="last")
        jax.block_until_ready(out["logits"])
        times.append(time.perf_counter() - start)
    result.update(first_forward_seconds=times[0], forward_seconds=times[-1], peak_after_forward_mb=_peak_mb())
    records = {f"visual/{k}": np.asarray(v, np.float32) for k, v in out["hooks"]["visual"]["attn.pattern"].items()}
    np.savez(save, logits=np.asarray(out["logits"], np.float32), **records)
    return result


def measurement_env(kind: str) -> dict:
    """The environment of a measurement's process: 1 simulated device for "load" and "convert", 8 for a mesh."""
    devices = 1 if kind in ("load", "convert") else 8
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def run_measurement(kind: str, path: Path, save: Path, forwards: int = 2) -> dict:
    """`measure` in a fresh process."""
    proc = subprocess.run([sys.executable, __file__, "--measure", kind, str(path), str(save), str(forwards)],
                          env=measurement_env(kind), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_records(a: Path, b: Path) -> dict:
    """max |Δ| of the probe's records and of the last-token logits; last-token KL and top-1 agreement."""
    x, y = np.load(a), np.load(b)
    diffs = {k: float(np.abs(x[k] - y[k]).max()) for k in x.files}
    finite = all(np.isfinite(x[k]).all() and np.isfinite(y[k]).all() for k in x.files)
    lx, ly = x["logits"][:, -1].astype(np.float64), y["logits"][:, -1].astype(np.float64)
    px = np.exp(lx - lx.max(-1, keepdims=True))
    px /= px.sum(-1, keepdims=True)
    log_q = ly - ly.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    kl = float((px * (np.log(px) - log_q)).sum(-1).max())
    return {"finite": finite, "max_abs": diffs, "last_token_kl": kl,
            "top1_same": bool((lx.argmax(-1) == ly.argmax(-1)).all()), "logit_scale": float(np.abs(lx).max())}


def run(shape: dict, workdir: Path, kinds=KINDS, forwards: int = 2) -> dict:
    """Write the checkpoint, then each measurement of `kinds` in its own process, one at a time (each result is
    printed as it comes, for a long run's log)."""
    ckpt = workdir / "hf"
    start = time.perf_counter()
    total = write_checkpoint(ckpt, **shape)
    results = {"shape": shape, "checkpoint_bytes": total, "write_seconds": time.perf_counter() - start}
    print(f"checkpoint: {total} bytes in {results['write_seconds']:.1f} s", flush=True)
    for kind in kinds:
        results[kind] = run_measurement(kind, ckpt, workdir / (kind + ("" if kind == "convert" else ".npz")), forwards)
        print(f"{kind}: {json.dumps(results[kind])}", flush=True)
    shutil.rmtree(workdir / "convert", ignore_errors=True)
    for kind in ("mesh", "fsdp"):
        if kind in kinds and "load" in kinds and forwards:
            results[f"{kind}_vs_one"] = compare_records(workdir / "load.npz", workdir / f"{kind}.npz")
    return results


def report(r: dict) -> str:
    gb = r["checkpoint_bytes"] / 2**30
    s = r["shape"]
    names = {"load": "(a) load, 1 device", "mesh": "(b) load, mesh data 2 x model 4, DEFAULT_RULES",
             "fsdp": "(b) load, mesh data 2 x model 4, FSDP_RULES", "convert": "(d) `vlmjax convert` (bf16)"}
    lines = [
        f"Shape: decoder {s['layers']} x {s['width']} ({s['heads']} heads, MLP {s['mlp']}, vocabulary {s['vocab']}), "
        f"CLIP ViT-L/14-336 with {s['vision_layers']} layers; bf16 checkpoint {gb:.3f} GiB "
        f"(written in {r['write_seconds']:.1f} s). Peak RSS per process; baseline = after imports and backend "
        "start, before reading weights.", "",
        "| measurement | peak RSS GiB | baseline GiB | peak / checkpoint | (peak - baseline) / checkpoint | s |",
        "|---|---|---|---|---|---|"]
    for kind, name in names.items():
        if kind not in r:
            continue
        m = r[kind]
        lines.append(f"| {name} | {m['peak_mb'] / 1024:.3f} | {m['baseline_mb'] / 1024:.3f} | "
                     f"{m['peak_mb'] / 1024 / gb:.2f}x | {(m['peak_mb'] - m['baseline_mb']) / 1024 / gb:.2f}x | "
                     f"{m.get('load_seconds', m.get('seconds')):.1f} |")
    lines.append("")
    for kind in ("mesh", "fsdp"):
        if f"{kind}_vs_one" not in r:
            continue
        m, c, one = r[kind], r[f"{kind}_vs_one"], r["load"]
        per_device = sorted(m["bytes_per_device"].values())
        sharded = r["checkpoint_bytes"] - m["replicated_bytes"]
        lines.append(
            f"- {names[kind][4:]}: {per_device[-1] / 2**20:.1f} MiB on the fullest device (sharded / 8 + "
            f"replicated = {(sharded / 8 + m['replicated_bytes']) / 2**20:.1f} MiB; replicated "
            f"{m['replicated_bytes'] / 2**20:.1f} MiB). (c) forward: {m['forward_seconds']:.2f} s "
            f"(first call, with compile, {m['first_forward_seconds']:.1f} s) against 1 device "
            f"{one['forward_seconds']:.2f} s (first {one['first_forward_seconds']:.1f} s); peak RSS with the "
            f"forward {m['peak_after_forward_mb'] / 1024:.3f} GiB (1 device {one['peak_after_forward_mb'] / 1024:.3f} "
            f"GiB); finite: {c['finite']}; probe mass max |Δ| "
            f"{c['max_abs']['visual/mass']:.1e}, last-token logits max |Δ| {c['max_abs']['logits']:.1e} "
            f"(|logits| up to {c['logit_scale']:.1f}), KL {c['last_token_kl']:.1e}, same top-1: {c['top1_same']}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in LLAVA_7B.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temp dir, deleted)")
    parser.add_argument("--out", default=None, help="append the results to this markdown file")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="the measurements to run")
    parser.add_argument("--forwards", type=int, default=2, help="probed forwards per load (the first compiles)")
    parser.add_argument("--measure", nargs=4, metavar=("KIND", "PATH", "SAVE", "FORWARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        kind, path, save, forwards = args.measure
        print(json.dumps(measure(kind, path, save, int(forwards))))
        return 0
    shape = {k: getattr(args, k) for k in LLAVA_7B}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vlmjax-scale-"))
    try:
        results = run(shape, workdir, args.kinds, args.forwards)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.out:
        label = "full LLaVA-1.5-7B shape" if shape == LLAVA_7B else "SCALED DOWN from LLaVA-1.5-7B's shape"
        with open(args.out, "a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d')}: `benchmarks/scale.py` ({label})\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
