"""The optimisation loop: AdamW with warmup and cosine decay, orbax checkpoints per stage with exact resume, and
the two stages (alignment, then instruction tuning)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from vlmjax import fingerprint
from vlmjax.train.data import conversation_batches, image_batches
from vlmjax.train.losses import alignment_loss, training_loss
from vlmjax.train.presets import TrainConfig


def make_optimizer(cfg: TrainConfig, steps: int, learning_rate: float) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to zero, gradient clipping, and weight decay on matrices only."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate,
                                                  max(1, int(cfg.warmup_fraction * steps)), steps)
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embed"), params)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask))



class StageCheckpoints:
    """Orbax checkpoints of one training stage (parameters, optimiser state, per-step loss history) under
    ``directory``, every ``every`` steps and at the stage's end, the two newest kept. The run's settings are written
    beside them, and a resume with other settings is refused: its steps would continue a different run."""

    def __init__(self, directory: str | Path, every: int, settings: dict):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.every = every
        settings = json.loads(json.dumps(settings))  # as stored (tuples become lists)
        settings_file = self.directory / "settings.json"
        if settings_file.exists():
            stored = json.loads(settings_file.read_text())
            differing = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            if differing:
                from vlmjax.errors import VlmJaxError

                raise VlmJaxError(
                    f"{self.directory} holds checkpoints of a run with other settings ({', '.join(differing)} "
                    f"differ: {', '.join(f'{k}={stored.get(k)!r} there, {settings.get(k)!r} now' for k in differing)}"
                    f"). Resume with the same settings, or train into another --out directory.")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            settings_file.write_text(json.dumps(settings, indent=1))
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2))

    def restore(self, params, opt_state) -> tuple[int, object, object, dict]:
        """(step, params, opt_state, log) of the newest checkpoint, or (0, the given state, an empty log) if none;
        the log holds the per-step loss history and the seconds spent on the stage so far."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            return 0, params, opt_state, {"history": {}, "seconds": 0.0}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      log=ocp.args.JsonRestore()))
        return step, restored["state"]["params"], restored["state"]["opt_state"], restored["log"]

    def save(self, step: int, params, opt_state, log: dict, final: bool) -> None:
        import orbax.checkpoint as ocp

        if final or step % self.every == 0:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                log=ocp.args.JsonSave(log)))
            if final:
                self.manager.wait_until_finished()


def fit(params, loss_fn, batch_stream, steps: int, learning_rate: float, cfg: TrainConfig, desc: str,
        progress: bool = True, checkpoints: StageCheckpoints | None = None):
    """Optimise ``loss_fn(params, batch) -> (loss, parts)`` over ``steps`` batches with a jitted AdamW step;
    returns (params, {part: per-step values}, seconds spent). ``batch_stream(start)`` yields the batches from step
    ``start``; with ``checkpoints`` the stage resumes from its newest checkpoint (a finished stage returns at once)
    and the seconds include those of the earlier pieces."""
    optimizer = make_optimizer(cfg, steps, learning_rate)

    @jax.jit
    def step(params, opt_state, batch):
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    opt_state, log, done = optimizer.init(params), {"history": {}, "seconds": 0.0}, 0
    if checkpoints is not None:
        done, params, opt_state, log = checkpoints.restore(params, opt_state)
    history, started = log["history"], time.perf_counter() - log["seconds"]
    bar = tqdm(batch_stream(done), total=steps, initial=done, desc=desc, disable=not progress or done == steps)
    for index, batch in enumerate(bar, start=done + 1):
        params, opt_state, parts = step(params, opt_state, batch)
        for name, value in parts.items():
            history.setdefault(name, []).append(float(value))
        if index % 10 == 0:
            bar.set_postfix({name: f"{np.mean(values[-10:]):.3f}" for name, values in history.items()})
        if checkpoints is not None:
            log = {"history": history, "seconds": time.perf_counter() - started}
            checkpoints.save(index, params, opt_state, log, final=index == steps)
    return params, history, time.perf_counter() - started if done < steps else log["seconds"]


def starting_point(cfg: TrainConfig, model) -> dict:
    """{"init_from_weights": fingerprint of the weights} for a run continuing ``cfg.init_from`` (``model``), else
    {}: part of the settings a resume must match, and of the training report (what the model was trained from)."""
    return {} if cfg.init_from is None else {"init_from_weights": fingerprint.of_model(model)["weights"]}


def train(model, data: dict[str, np.ndarray], cfg: TrainConfig, progress: bool = True,
          checkpoint_dir: str | Path | None = None):
    """Two stages from ``model.params``: ``cfg.alignment_steps`` of ``alignment_loss`` on images (none when 0),
    then ``cfg.steps`` of ``training_loss`` on conversations. Returns (params, {"alignment": history, "training":
    history}, seconds of training), each history holding per-step values of the loss parts. With
    ``checkpoint_dir`` each stage checkpoints there (orbax) and a rerun resumes where the last one stopped; the
    settings a resume must match include the starting weights (``starting_point``)."""
    settings = {**dataclasses.asdict(cfg), **starting_point(cfg, model)}
    stage = lambda name: None if checkpoint_dir is None else StageCheckpoints(
        Path(checkpoint_dir) / name, cfg.checkpoint_every, settings)
    params, aligned, align_seconds = model.params, {}, 0.0
    if cfg.alignment_steps:
        params, aligned, align_seconds = fit(
            params, lambda p, b: alignment_loss(model, p, b),
            lambda start: image_batches(model, data, cfg.batch_size, cfg.alignment_steps, cfg.seed, start),
            cfg.alignment_steps, cfg.alignment_learning_rate, cfg, "aligning", progress, stage("alignment"))
    params, trained, train_seconds = fit(params, lambda p, b: training_loss(model, p, b, cfg.grounding_weight),
                          lambda start: conversation_batches(model, data, cfg.batch_size, cfg.steps, cfg.seed, start),
                          cfg.steps, cfg.learning_rate, cfg, "training", progress, stage("training"))
    return params, {"alignment": aligned, "training": trained}, align_seconds + train_seconds
