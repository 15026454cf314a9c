"""The accelerator check: bf16 parity against HF and the attention benchmarks at LLaVA-1.5-7B's shape, on one GPU.

`bash benchmarks/accelerator.sh OUT_DIR` (under 8 minutes on one H100/H200-class GPU). Each step runs in its own
process, so JAX and PyTorch never hold the device's memory at the same time:
1. a random LLaVA-1.5-7B-shaped bf16 checkpoint (benchmarks/scale.py) and a batch of one image + a 40-token
   question per sample (616 tokens);
2. HF PyTorch, bf16: logits (sdpa) for parity; prefill to the last token's logits (sdpa); the visual-attention
   profile (eager, output_attentions=True, mass reduced from the returned patterns); the 16-value VIAR sweep
   (eager, one pass per value with a pre-hook adding the bias to the mask's visual columns);
3. vlmjax, bf16: the same logits; prefill; the `VisualAttention` probe; `make_sweep` with chunk=None (one vmap)
   and chunked; the device's measured bf16 matmul peak;
4. the same parity on builtin:llava-shapes, a trained model (processor-built inputs);
then OUT_DIR/accelerator.json and OUT_DIR/accelerator.md: per-token KL (HF || vlmjax) and top-1 agreement
(goals: KL <= 0.01, >= 99%), seconds, and MFU on the FLOPs each result needs (against the measured peak and, for
known GPUs, the nominal dense bf16 peak). `--tiny` runs everything on a small shape on CPU (a smoke test).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import scale  # noqa: E402

TINY = dict(layers=2, width=256, heads=4, mlp=688, vocab=32064, vision_layers=1)
NOMINAL_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, FLOP/s
QUESTION = scale.NUM_TOKENS - scale.NUM_VISUAL - 5  # the text after the image
SWEEP_VALUES = np.linspace(0.0, 3.0, 16, dtype=np.float32)


def sweep_zone(layers: int) -> range:
    """The VIAR zone: the middle third of the decoder's layers."""
    return range(layers // 3, max(2 * layers // 3, layers // 3 + 1))


def needed_flops(shape: dict, batch: int, task: str, chunk_values: int = len(SWEEP_VALUES)) -> float:
    """2 x multiply-adds the result needs (vision tower to its feature layer -2, projector, decoder; attention
    counted over the full N x N). prefill: every layer and one vocabulary row; profile: the last layer only up to
    its pattern, no vocabulary; sweep: the layers before the zone once, then per value the rest and one row."""
    d, f, v, layers = shape["width"], shape["mlp"], shape["vocab"], shape["layers"]
    dv, t, n = 1024, scale.NUM_VISUAL + 1, scale.NUM_TOKENS
    vision_layer = 2 * t * (4 * dv * dv + 2 * dv * 4 * dv) + 4 * t * t * dv
    shared = 2 * scale.NUM_VISUAL * (3 * 14 * 14 * dv + dv * d + d * d) + (shape["vision_layers"] - 1) * vision_layer
    layer = 2 * n * (4 * d * d + 3 * d * f) + 4 * n * n * d
    head = 2 * d * v
    if task == "prefill":
        total = shared + layers * layer + head
    elif task == "profile":
        total = shared + (layers - 1) * layer + 2 * n * 2 * d * d + 2 * n * n * d
    else:
        first = sweep_zone(layers)[0]
        total = shared + first * layer + chunk_values * ((layers - first) * layer + head)
    return batch * total


def _best(fn, repeats: int, sync) -> float:
    fn()
    sync()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _compared_logits(logits: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.asarray(logits, np.float32)[positions]  # [P, V]


def run_hf(path: str, inputs_file: str, save: str, bench: bool, repeats: int) -> dict:
    """HF PyTorch bf16: logits at the compared positions, and (bench) the timings."""
    import torch
    from transformers import AutoModelForImageTextToText

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.set_grad_enabled(False)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(device).eval()
    inputs = dict(np.load(inputs_file))
    positions = inputs.pop("_positions")
    feed = {k: torch.as_tensor(v).to(device) for k, v in inputs.items()}
    feed["pixel_values"] = feed["pixel_values"].to(torch.bfloat16)
    np.save(save, _compared_logits(model(**feed).logits.float().cpu().numpy(), positions))
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    if not bench:
        return result
    result["prefill_sdpa"] = _best(lambda: model(**feed, logits_to_keep=1), repeats, sync)
    model.set_attn_implementation("eager")
    visual = feed["input_ids"] == model.config.image_token_id
    text = torch.zeros_like(visual)
    text[:, visual.nonzero()[:, 1].max() + 1:] = True

    def profile():
        out = model(**feed, output_attentions=True, logits_to_keep=1)
        masses = [((a * visual[:, None, None, :]).sum(-1) * text[:, None]).sum(-1) / text.sum(-1)[:, None]
                  for a in out.attentions]
        return torch.stack(masses, 1)

    layers = model.model.language_model.layers

    def sweep():
        results = []
        for b in SWEEP_VALUES:
            def add_bias(module, args, kwargs, b=float(b)):
                kwargs["attention_mask"] = kwargs["attention_mask"] + b * visual[:, None, None, :].to(model.dtype)
                return args, kwargs

            handles = [layers[i].self_attn.register_forward_pre_hook(add_bias, with_kwargs=True)
                       for i in sweep_zone(len(layers))]
            results.append(model(**feed, logits_to_keep=1).logits)
            for h in handles:
                h.remove()
        return torch.stack(results)

    result["profile_eager"] = _best(profile, repeats, sync)
    result["sweep_eager_hooks"] = _best(sweep, repeats, sync)
    return result


def run_jax(path: str, inputs_file: str, save: str, bench: bool, repeats: int, chunk: int) -> dict:
    """vlmjax bf16: logits at the compared positions, and (bench) the timings and the matmul peak."""
    import jax
    import jax.numpy as jnp

    import vlmjax
    from vlmjax import interventions as iv
    from vlmjax.probes import VisualAttention
    from vlmjax.sweep import make_sweep

    model = vlmjax.load(path, dtype="bfloat16", progress=False)
    inputs = dict(np.load(inputs_file))
    positions = inputs.pop("_positions")
    batch, _ = model.prepare(inputs)
    batch = jax.device_put(batch)  # on the device once, as HF's inputs are
    logits = jax.jit(lambda p, b: model.forward(p, b, {}, logits="all")["logits"])(model.params, batch)
    np.save(save, _compared_logits(logits, positions))
    result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    if not bench:
        return result
    sync = lambda: None
    ready = lambda f: (lambda: jax.block_until_ready(f()))
    prefill = jax.jit(lambda p, b: model.forward(p, b, {}, logits="last")["logits"])
    profile = jax.jit(lambda p, b: model.forward(p, b, {"visual": VisualAttention()}, logits=None)["hooks"])
    zone = sweep_zone(model.num_layers["blocks"])
    flags = jnp.asarray(iv.layer_flags(model.num_layers["blocks"], zone), jnp.bfloat16)
    sweeps = {name: make_sweep(model, lambda v: {"viar": iv.AttentionBias(v * flags)}, first_layer=zone[0],
                               chunk=c) for name, c in (("sweep_vmap", None), ("sweep_chunked", chunk))}
    result["prefill"] = _best(ready(lambda: prefill(model.params, batch)), repeats, sync)
    result["profile"] = _best(ready(lambda: profile(model.params, batch)), repeats, sync)
    for name, run in sweeps.items():
        result[name] = _best(ready(lambda run=run: run(model.params, batch, SWEEP_VALUES)["logits"]), repeats, sync)
    size = 8192 if jax.default_backend() != "cpu" else 1024
    a = jnp.ones((size, size), jnp.bfloat16)
    matmul = jax.jit(lambda x: x @ x)
    result["matmul_peak"] = 2 * size**3 / _best(ready(lambda: matmul(a)), 5, sync)
    return result


def parity(hf_file: Path, jax_file: Path) -> dict:
    """Per-token KL(HF || vlmjax) over the compared positions, and the top-1 agreement."""
    p, q = np.load(hf_file).astype(np.float64), np.load(jax_file).astype(np.float64)
    log_p = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
    log_q = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return {"tokens": len(kl), "kl_max": float(kl.max()), "kl_mean": float(kl.mean()),
            "top1_agreement": float((p.argmax(-1) == q.argmax(-1)).mean())}


def _subprocess(part: str, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, __file__, "--part", part, *map(str, args)], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"{part} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def question_batch(size: int) -> dict:
    """`size` samples of one image + 40-token question; the question's positions are compared."""
    samples = [scale.question_inputs(seed) for seed in range(size)]
    batch = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
    positions = np.zeros(batch["input_ids"].shape, bool)
    positions[:, -QUESTION:] = True
    return {**batch, "_positions": positions}


def builtin_batch() -> dict:
    """builtin:llava-shapes' processor on two prompts with random images; every real token is compared."""
    from vlmjax.builtin import builtin_path
    from vlmjax.cli import _example_inputs

    _, inputs = _example_inputs(builtin_path("llava-shapes"), num_images=2)
    return {**inputs, "_positions": np.asarray(inputs["attention_mask"]).astype(bool)}


def report(r: dict) -> str:
    s, b = r["shape"], r["batch"]
    hf, jx = r["hf"], r["jax"]
    nominal = next((v for k, v in NOMINAL_BF16_PEAK.items() if k in hf["device"]), None)
    peaks = f"measured bf16 matmul peak {jx['matmul_peak'] / 1e12:.3g} TFLOP/s" + (
        f", nominal {nominal / 1e12:.0f}" if nominal else "")
    lines = [f"Devices: HF on {hf['device']} (torch {hf['torch']}), vlmjax on {jx['device']} (jax {jx['jax']}); "
             f"{peaks}. Shape: decoder {s['layers']} x {s['width']} (MLP {s['mlp']}, vocabulary {s['vocab']}), "
             f"CLIP ViT-L/14-336 with {s['vision_layers']} layers; batch {b} x 616 tokens; bf16.", "",
             "| parity (bf16, HF sdpa vs vlmjax) | tokens | KL max | KL mean | top-1 agreement |", "|---|---|---|---|---|"]
    for name, key in (("random 7B-shaped" if s == scale.LLAVA_7B else "random, this shape", "parity"),
                      ("builtin:llava-shapes (trained)", "parity_builtin")):
        p = r[key]
        lines.append(f"| {name} | {p['tokens']} | {p['kl_max']:.2e} | {p['kl_mean']:.2e} | {p['top1_agreement']:.1%} |")
    lines += ["", "| task | impl | s / batch | needed TFLOP | TFLOP/s | MFU (measured) | MFU (nominal) | vs HF |",
              "|---|---|---|---|---|---|---|---|"]
    rows = (("prefill", "HF sdpa", hf["prefill_sdpa"], "prefill", None),
            ("prefill", "vlmjax", jx["prefill"], "prefill", hf["prefill_sdpa"]),
            ("attention profile", "HF eager + output_attentions", hf["profile_eager"], "profile", None),
            ("attention profile", "vlmjax VisualAttention", jx["profile"], "profile", hf["profile_eager"]),
            ("16-value VIAR sweep", "HF eager, hooks", hf["sweep_eager_hooks"], "sweep", None),
            ("16-value VIAR sweep", "vlmjax chunk=None", jx["sweep_vmap"], "sweep", hf["sweep_eager_hooks"]),
            ("16-value VIAR sweep", f"vlmjax chunk={r['chunk']}", jx["sweep_chunked"], "sweep",
             hf["sweep_eager_hooks"]))
    for task, impl, seconds, kind, base in rows:
        flops = needed_flops(s, b, kind)
        rate = flops / seconds
        lines.append(f"| {task} | {impl} | {seconds:.3f} | {flops / 1e12:.3g} | {rate / 1e12:.3g} | "
                     f"{rate / jx['matmul_peak']:.0%} | {f'{rate / nominal:.0%}' if nominal else '-'} | "
                     f"{f'{base / seconds:.2f}x' if base else ''} |")
    lines.append(f"\nGoals: prefill >= 50% MFU and >= 1.5x HF sdpa; sweep >= 3x HF eager hooks; parity KL <= 0.01, "
                 f"top-1 >= 99%. Total {r['seconds']:.0f} s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="benchmarks", help="where accelerator.json / accelerator.md go")
    parser.add_argument("--tiny", action="store_true", help="a small shape on whatever device is there (smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="samples per batch (default 4; 1 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs, best taken (default 3; 1 with --tiny)")
    parser.add_argument("--chunk", type=int, default=4, help="values per step of the chunked sweep")
    parser.add_argument("--workdir", default=None, help="checkpoint directory (default: a temp dir, deleted)")
    parser.add_argument("--part", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        part, path, inputs_file, save, bench, repeats, *rest = args.part
        fn = run_hf if part == "hf" else run_jax
        extra = [int(rest[0])] if part == "jax" else []
        print(json.dumps(fn(path, inputs_file, save, bench == "1", int(repeats), *extra)))
        return 0
    start = time.perf_counter()
    shape = TINY if args.tiny else scale.LLAVA_7B
    batch, repeats = args.batch or (1 if args.tiny else 4), args.repeats or (1 if args.tiny else 3)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vlmjax-accelerator-"))
    try:
        ckpt = workdir / "hf"
        scale.write_checkpoint(ckpt, **shape)
        print(f"checkpoint written ({time.perf_counter() - start:.0f} s)", flush=True)
        np.savez(workdir / "inputs.npz", **question_batch(batch))
        np.savez(workdir / "builtin.npz", **builtin_batch())
        r = {"shape": shape, "batch": batch, "chunk": args.chunk, "repeats": repeats}
        r["hf"] = _subprocess("hf", ckpt, workdir / "inputs.npz", workdir / "hf.npy", 1, repeats)
        print("HF done", r["hf"], flush=True)
        r["jax"] = _subprocess("jax", ckpt, workdir / "inputs.npz", workdir / "jax.npy", 1, repeats, args.chunk)
        print("vlmjax done", r["jax"], flush=True)
        r["parity"] = parity(workdir / "hf.npy", workdir / "jax.npy")
        from vlmjax.builtin import builtin_path

        builtin = builtin_path("llava-shapes")
        _subprocess("hf", builtin, workdir / "builtin.npz", workdir / "hf_builtin.npy", 0, 1)
        _subprocess("jax", builtin, workdir / "builtin.npz", workdir / "jax_builtin.npy", 0, 1, args.chunk)
        r["parity_builtin"] = parity(workdir / "hf_builtin.npy", workdir / "jax_builtin.npy")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    r["seconds"] = time.perf_counter() - start
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "accelerator-tiny" if args.tiny else "accelerator"
    (out / f"{name}.json").write_text(json.dumps(r, indent=2))
    text = f"# {'Smoke run (--tiny)' if args.tiny else 'Accelerator check'}, {time.strftime('%Y-%m-%d')}\n\n{report(r)}\n"
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
