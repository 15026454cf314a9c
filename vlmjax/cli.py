"""`vlmjax` command line: convert, verify, info, eval."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from vlmjax import builtin
from vlmjax.checks import dtype_name, positive_int, writable_dir
from vlmjax.data.shapes import POPE_SPLITS
from vlmjax.errors import VlmJaxError

TOLERANCE = 1e-4


def cmd_convert(args) -> int:
    """Write into a temporary directory beside the target, then rename it into place: a failed or killed
    conversion never leaves a half-written model, and a non-empty target is replaced only with --overwrite."""
    import os
    import shutil

    import jax.numpy as jnp

    from converters import hf, orbax_io, streaming
    from vlmjax import models
    from vlmjax.checks import check_params_finite

    dst = Path(args.dst).resolve()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        raise VlmJaxError(f"The target {dst} is not empty (it would mix two models' files): choose a new or empty "
                          "directory, or pass --overwrite to replace it.")
    hf_config = hf.read_hf_config(args.src)
    cfg = models.from_hf(hf_config)
    params = streaming.load(args.src, cfg, jnp.dtype(args.dtype), progress=True)  # one tensor at a time
    check_params_finite(params, args.src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
    try:
        orbax_io.save(params, hf_config, staging, source_dir=args.src)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.replaced-", dir=dst.parent))
            os.replace(dst, old / "old")
            os.replace(staging, dst)
            shutil.rmtree(old)
        else:
            os.replace(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"converted {args.src} -> {dst} ({args.dtype})")
    return 0


def cmd_verify(args) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from vlmjax.verify import verify

    path = Path(args.path) if args.path else None
    if path is not None and not args.tiny:
        check_model_dir(path)
    if args.tiny:
        from vlmjax.testing.tiny import VARIANTS, make_tiny_llava

        if args.variant not in VARIANTS:
            raise VlmJaxError(f"--variant: invalid choice: {args.variant!r} (choose from {', '.join(sorted(VARIANTS))})")

        path = Path(args.path or tempfile.mkdtemp(prefix="vlmjax-tiny-"))
        make_tiny_llava(path, variant=args.variant)
        print(f"built a tiny random LLaVA ({args.variant}) in {path}")
    if path is None:
        raise VlmJaxError("Give a checkpoint directory, or --tiny to build a tiny model to verify.")
    result, inputs = verify(path)
    print(f"vlmjax vs HF PyTorch (fp32, eager attention), batch of {inputs['input_ids'].shape[0]}, "
          f"{inputs['input_ids'].shape[1]} tokens:")
    print(result.table())
    ok = result.worst <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'}: worst max|Δ| {result.worst:.3e} (tolerance {args.tolerance:.0e})")
    return 0 if ok else 1


def check_model_dir(path: Path) -> None:
    """A checkpoint directory with its processor files, which verify needs to build its example inputs."""
    from converters.hf import read_hf_config

    read_hf_config(path)
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise VlmJaxError(f"{path} has a config.json but no processor files (preprocessor_config.json or "
                          "processor_config.json, with the tokenizer files): verify builds its inputs with the "
                          "checkpoint's processor. Save it beside the weights with processor.save_pretrained(dir).")


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
        from vlmjax.verify import EXAMPLE_SIZES, example_inputs

        _, inputs = example_inputs(Path(args.path), num_images=1)
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
    from vlmjax.eval.run import evaluate_pope, load_shapes_pope, shapes_dataset, shapes_image_size

    out = writable_dir(args.out)
    if args.pope and not args.images:
        raise VlmJaxError("--pope needs --images, the folder the question file's image names refer to.")
    if args.pope:
        records = load_pope(args.pope, args.images)[: args.limit]
        if not records:
            raise VlmJaxError(f"--pope {args.pope} holds no questions: give a JSONL file with one question per line.")
    model = vlmjax.load(args.model, progress=False)
    processor = vlmjax.load_processor(model.path)
    if not args.pope:
        if args.distributed and not (args.data and (Path(args.data) / "dataset.json").is_file()):
            raise VlmJaxError("With --distributed, generate the dataset first (`python -m vlmjax.data.shapes DIR`, or "
                              "one single-process run) and pass --data DIR.")
        data = shapes_dataset(args.data, out, args.n_images, args.seed, shapes_image_size(model, processor),
                              args.overwrite)
        records = load_shapes_pope(data, splits=args.splits, limit=args.limit)
    name = f"results{'-' + args.null_image if args.null_image else ''}.jsonl"
    if args.distributed:  # this process's share into its own shard; process 0 merges once all are written
        import jax
        from jax.experimental import multihost_utils

        from vlmjax.eval import distributed

        index, count = jax.process_index(), jax.process_count()
        evaluate_pope(model, processor, distributed.share(records, index, count),
                      distributed.shard_path(out / name, index, count), batch_size=args.batch_size,
                      image_kind=args.null_image, logdir=out / "tensorboard" / f"process-{index}",
                      data=args.pope or data, overwrite=args.overwrite)
        multihost_utils.sync_global_devices("vlmjax eval: every shard written")
        if index:
            return 0
        results = distributed.merge(out / name, [q.question_id for q in records], count)
    else:
        results = evaluate_pope(model, processor, records, out / name, batch_size=args.batch_size,
                                image_kind=args.null_image, logdir=out / "tensorboard", data=args.pope or data,
                                overwrite=args.overwrite)
    print(f"{model.path} on {len(records)} questions{' with ' + args.null_image + ' images' if args.null_image else ''}"
          f" (records: {out / name})")
    print(format_table(score_pope(r for r in results if r["id"] in {q.question_id for q in records})))
    return 0


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlmjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, help="what to do (`vlmjax COMMAND --help` for its flags)")
    p = sub.add_parser("convert", help="HF checkpoint directory -> vlmjax orbax directory")
    p.add_argument("src", help="HF checkpoint directory (config, safetensors, processor files) or builtin:NAME")
    p.add_argument("dst", help="output directory: the orbax checkpoint with the config and processor files beside it")
    p.add_argument("--dtype", default="float32", type=dtype_name,
                   help="dtype the parameters are stored in: float32, bfloat16 or float16 (fp32, bf16, fp16; "
                        "default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty target directory")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("verify", help="per-layer max |Δ| of vlmjax vs the HF PyTorch reference")
    p.add_argument("path", nargs="?", help="HF checkpoint directory (with its processor files) or builtin:NAME")
    p.add_argument("--tiny", action="store_true", help="build a tiny random LLaVA (into PATH or a temp dir)")
    p.add_argument("--variant", default="gqa", help="tiny model variant (see vlmjax.testing.tiny.VARIANTS)")
    p.add_argument("--tolerance", type=positive_float, default=TOLERANCE,
                   help="largest max |Δ| (logits, hidden states, attentions) that passes (default: %(default)s)")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("eval", help="POPE-style evaluation (resumable; records appended as they are done)")
    p.add_argument("--model", default="builtin:llava-shapes", help="checkpoint directory or builtin:NAME")
    p.add_argument("--data", help="a shapes-world dataset directory (generated into OUT/data if absent)")
    p.add_argument("--pope", help="a POPE question file (JSONL: question_id, image, text, label) instead of --data")
    p.add_argument("--images", help="image folder for --pope")
    p.add_argument("--splits", nargs="+", default=list(POPE_SPLITS), choices=POPE_SPLITS,
                   help="POPE negative-sampling splits of a shapes-world set to ask (default: all three)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many questions per split")
    p.add_argument("--n-images", type=positive_int, default=300,
                   help="images to generate when no dataset is given (a fifth are the test images asked about)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the generated set (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="prompts per forward; the last batch is padded, so one compile serves all (default: %(default)s)")
    p.add_argument("--null-image", choices=["black", "gray"], help="replace every image (does the model look?)")
    p.add_argument("--out", default="runs/eval",
                   help="directory of the records (JSONL, resumed if present), TensorBoard logs and a generated set "
                        "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard records in --out written by another model, settings or data (else refused)")
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes (README, Sharding): each evaluates its share into its own records "
                        "shard, resumable; process 0 merges them into the results file")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("info", help="config, parameter count, visual tokens per image")
    p.add_argument("path", help="HF checkpoint directory or builtin:NAME")
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
