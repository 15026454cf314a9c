"""`vlmjax` command line: convert, verify, info, eval."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from vlmjax import builtin
from vlmjax.errors import VlmJaxError

TOLERANCE = 1e-4
EXAMPLE_SIZES = ((80, 60), (48, 96), (64, 64))  # (height, width) of the example images


def _example_inputs(path: Path, num_images: int = 2, seed: int = 0):
    """Processor outputs for a padded batch of `num_images` prompts, each with one random image."""
    from PIL import Image

    from vlmjax.inputs import load_processor

    processor = load_processor(path)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray((rng.random((*EXAMPLE_SIZES[i % 3], 3)) * 255).astype("uint8"))
              for i in range(num_images)]
    token = getattr(processor, "image_token", "<image>")
    texts = [f"USER: {token} what is in the image ? ASSISTANT:",
             f"USER: {token} how many red circle are there in the box ? yes or no ? ASSISTANT: the"][:num_images]
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"
    return processor, dict(processor(images=images, text=texts, return_tensors="np", padding=True))


def cmd_convert(args) -> int:
    import jax.numpy as jnp

    from converters import hf, orbax_io, streaming
    from vlmjax import models

    hf_config = hf.read_hf_config(args.src)
    cfg = models.from_hf(hf_config)
    params = streaming.load(args.src, cfg, jnp.dtype(args.dtype), progress=True)  # one tensor at a time
    out = orbax_io.save(params, hf_config, args.dst, source_dir=args.src)
    print(f"converted {args.src} -> {out} ({args.dtype})")
    return 0


def cmd_verify(args) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import vlmjax
    from vlmjax.reference import compare, load_hf_model, run_hf

    path = Path(args.path) if args.path else None
    if args.tiny:
        from vlmjax.tiny import make_tiny_llava

        path = Path(args.path or tempfile.mkdtemp(prefix="vlmjax-tiny-"))
        make_tiny_llava(path, variant=args.variant)
        print(f"built a tiny random LLaVA ({args.variant}) in {path}")
    if path is None:
        raise VlmJaxError("Give a checkpoint directory, or --tiny to build a tiny model to verify.")
    _, inputs = _example_inputs(path)
    model = vlmjax.load(path, dtype="float32", progress=False)
    ours = model(**inputs, output_hidden_states=True, output_attentions=True)
    theirs = run_hf(load_hf_model(path), inputs)
    result = compare(ours, theirs)
    print(f"vlmjax vs HF PyTorch (fp32, eager attention), batch of {inputs['input_ids'].shape[0]}, "
          f"{inputs['input_ids'].shape[1]} tokens:")
    print(result.table())
    ok = result.worst <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: worst max|Δ| {result.worst:.3e} (tolerance {args.tolerance:.0e})")
    return 0 if ok else 1


def cmd_info(args) -> int:
    from converters import hf
    from vlmjax import models

    hf_config = hf.read_hf_config(args.path)
    cfg = models.from_hf(hf_config)
    shapes = hf.expected_shapes(cfg)
    count = sum(int(np.prod(s)) for s in shapes.values())
    print(f"model_type: {cfg.model_type}")
    print(f"parameters: {count:,}")
    for name, sub in (("vision", getattr(cfg, "vision", None)), ("text", getattr(cfg, "text", None))):
        if sub is not None:
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in vars(sub).items()))
    rest = {k: v for k, v in vars(cfg).items() if k not in ("vision", "text")}
    print("model: " + ", ".join(f"{k}={v}" for k, v in rest.items()))
    if (Path(args.path) / "processor_config.json").exists() or (Path(args.path) / "preprocessor_config.json").exists():
        processor, inputs = _example_inputs(Path(args.path), num_images=1)
        model_module = models.family(cfg.model_type)
        _, meta = model_module.prepare_batch(cfg, inputs, "float32")
        height, width = EXAMPLE_SIZES[0]
        print(f"visual tokens for one {height}x{width} (height x width) image with this processor: "
              f"{int(meta.mask.sum())}")
    return 0


def cmd_eval(args) -> int:
    if args.distributed:
        from vlmjax.sharding import initialize_distributed

        initialize_distributed()  # before anything touches a JAX backend
    import vlmjax
    from vlmjax.data.loaders import load_pope
    from vlmjax.eval.pope import format_table, score_pope
    from vlmjax.eval.run import evaluate_pope, load_shapes_pope, shapes_image_size

    model = vlmjax.load(args.model, progress=False)
    from vlmjax.inputs import load_processor

    processor = load_processor(model.path)
    out = Path(args.out)
    if args.pope:
        if not args.images:
            raise VlmJaxError("--pope needs --images, the folder the question file's image names refer to.")
        records = load_pope(args.pope, args.images)[: args.limit]
    else:
        data = Path(args.data) if args.data else out / "data"
        if not (data / "dataset.json").is_file():
            if args.distributed:
                raise VlmJaxError(f"No dataset in {data}: with --distributed, generate it first (`python -m "
                                  "vlmjax.data.shapes DIR`, or one single-process run) and pass --data DIR.")
            from vlmjax.data.shapes import generate_dataset

            side = shapes_image_size(model, processor)
            print(f"generating a shapes-world POPE set ({args.n_images} images of {side}x{side}, seed {args.seed}) "
                  f"in {data}")
            generate_dataset(str(data), args.n_images, args.seed, image_size=side)
        records = load_shapes_pope(data, splits=args.splits, limit=args.limit)
    name = f"results{'-' + args.null_image if args.null_image else ''}.jsonl"
    if args.distributed:  # this process's share into its own shard; process 0 merges once all are written
        import jax
        from jax.experimental import multihost_utils

        from vlmjax.eval import distributed

        index, count = jax.process_index(), jax.process_count()
        evaluate_pope(model, processor, distributed.share(records, index, count),
                      distributed.shard_path(out / name, index, count), batch_size=args.batch_size,
                      image_kind=args.null_image, logdir=out / "tensorboard" / f"process-{index}")
        multihost_utils.sync_global_devices("vlmjax eval: every shard written")
        if index:
            return 0
        results = distributed.merge(out / name, [q.question_id for q in records], count)
    else:
        results = evaluate_pope(model, processor, records, out / name, batch_size=args.batch_size,
                                image_kind=args.null_image, logdir=out / "tensorboard")
    print(f"{model.path} on {len(records)} questions{' with ' + args.null_image + ' images' if args.null_image else ''}"
          f" (records: {out / name})")
    print(format_table(score_pope(r for r in results if r["id"] in {q.question_id for q in records})))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlmjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="HF checkpoint directory -> vlmjax orbax directory")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("verify", help="per-layer max |Δ| of vlmjax vs the HF PyTorch reference")
    p.add_argument("path", nargs="?", help="HF checkpoint directory (with its processor files) or builtin:NAME")
    p.add_argument("--tiny", action="store_true", help="build a tiny random LLaVA (into PATH or a temp dir)")
    p.add_argument("--variant", default="gqa", help="tiny model variant (see vlmjax.tiny.VARIANTS)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE)
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("eval", help="POPE-style evaluation (resumable; records appended as they are done)")
    p.add_argument("--model", default="builtin:llava-shapes", help="checkpoint directory or builtin:NAME")
    p.add_argument("--data", help="a shapes-world dataset directory (generated into OUT/data if absent)")
    p.add_argument("--pope", help="a POPE question file (JSONL: question_id, image, text, label) instead of --data")
    p.add_argument("--images", help="image folder for --pope")
    p.add_argument("--splits", nargs="+", default=["random", "popular", "adversarial"])
    p.add_argument("--limit", type=int, default=None, help="at most this many questions per split")
    p.add_argument("--n-images", type=int, default=300,
                   help="images to generate when no dataset is given (a fifth are the test images asked about)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--null-image", choices=["black", "gray"], help="replace every image (does the model look?)")
    p.add_argument("--out", default="runs/eval")
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes (README, Sharding): each evaluates its share into its own records "
                        "shard, resumable; process 0 merges them into the results file")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("info", help="config, parameter count, visual tokens per image")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    try:
        for name in ("src", "path"):  # a shipped model by name: builtin:NAME
            if getattr(args, name, None):
                setattr(args, name, str(builtin.resolve(getattr(args, name))))
        return args.func(args)
    except VlmJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
