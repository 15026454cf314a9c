"""Data- and model-parallel execution over a device mesh.

A `Mesh` with axes ("data", "model"); parameters are placed by regex rules on their path (first match wins) and
the batch is split over "data". The forward is `jax.jit` with those NamedShardings; XLA's SPMD partitioner inserts
the collectives. The same code runs on one device, on simulated CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) and multi-host: call `initialize_distributed()` first on
every host (it wraps `jax.distributed.initialize`), build the mesh over `jax.devices()` (all hosts), and feed each
host's slice of the batch — `shard_batch` assembles the global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vlmjax.api import ordered
from vlmjax.errors import VlmJaxError

# Megatron-style: column-parallel in-projections, row-parallel out-projections, vocab-parallel embeddings/head.
# Stacked layer params have a leading [L] axis that stays unsharded.
DEFAULT_RULES = (
    (r"layers/(q|k|v|gate|up|fc1)/kernel$", P(None, None, "model")),
    (r"layers/(q|k|v|gate|up|fc1)/bias$", P(None, "model")),
    (r"layers/(o|down|fc2)/kernel$", P(None, "model", None)),
    (r"text/embed$", P("model", None)),
    (r"lm_head/kernel$", P(None, "model")),
    (r"projector/linear_1/kernel$", P(None, "model")),
    (r"projector/linear_2/kernel$", P("model", None)),
    (r".*", P()),
)

# DEFAULT_RULES with each weight's other dimension split over "data" as well (FSDP / ZeRO-3 style): every weight is
# stored once per mesh (1/(data x model) per device) and XLA gathers each layer's weights over "data" when used.
FSDP_RULES = (
    (r"layers/(q|k|v|gate|up|fc1)/kernel$", P(None, "data", "model")),
    (r"layers/(q|k|v|gate|up|fc1)/bias$", P(None, ("data", "model"))),
    (r"layers/(o|down|fc2)/kernel$", P(None, "model", "data")),
    (r"text/embed$", P("model", "data")),
    (r"lm_head/kernel$", P("data", "model")),
    (r"projector/linear_1/kernel$", P("data", "model")),
    (r"projector/linear_2/kernel$", P("model", "data")),
    (r".*", P()),
)


def initialize_distributed(**kwargs) -> None:
    """Multi-process set-up (a no-op on one process); call it first, before anything touches a JAX backend.
    Explicit coordinator_address / num_processes / process_id; else JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID from the environment (one command per host, any cluster); else the auto-detection of
    `jax.distributed.initialize` (TPU pod slices, SLURM, Open MPI, Kubernetes)."""
    env = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
           "process_id": "JAX_PROCESS_ID"}
    if not kwargs and all(v in os.environ for v in env.values()):
        kwargs = {k: os.environ[v] if k == "coordinator_address" else int(os.environ[v]) for k, v in env.items()}
    if kwargs or _cluster_env():
        jax.distributed.initialize(**kwargs)


def _cluster_env() -> bool:
    return any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                          "OMPI_COMM_WORLD_SIZE"))


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    data = len(devices) // model if data is None else data
    if data * model != len(devices):
        raise VlmJaxError(f"A mesh of data={data} x model={model} needs {data * model} devices; "
                          f"{len(devices)} are available.")
    return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drop a rule's axis on a dimension the mesh axis does not divide (that dimension is replicated)."""
    dims = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for size, axis in zip(shape, dims):
        ways = int(np.prod([mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ())]))
        out.append(axis if size % ways == 0 else None)
    return P(*out)


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES):
    """A tree of NamedSharding for `params`, by the first rule whose regex matches the parameter's path."""

    def one(path, leaf):
        name = _path_str(path)
        for pattern, spec in rules:
            if re.search(pattern, name):
                return NamedSharding(mesh, _fit(spec, np.shape(leaf), mesh))
        raise VlmJaxError(f"No sharding rule matches parameter {name}; end the rules with ('.*', P()).")

    return jax.tree_util.tree_map_with_path(one, params)


def shard_params(params, mesh: Mesh, rules=DEFAULT_RULES):
    return jax.device_put(params, param_shardings(params, mesh, rules))


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
    """Rows of every batch array over "data"; per-image arrays (pixel_values) too when the mesh divides them."""
    data = mesh.shape["data"]
    rows = np.shape(batch["input_ids"])[0]
    if rows % data:
        raise VlmJaxError(f"A batch of {rows} samples cannot be split over the mesh's data axis of {data} devices. "
                          f"Use a batch size that is a multiple of {data} (pad with dummy samples) or a smaller "
                          "data axis.")
    out = {}
    for k, v in batch.items():
        lead = np.shape(v)[0] if np.ndim(v) else 0
        split = lead and lead % data == 0
        out[k] = NamedSharding(mesh, P("data") if split else P())
    return out


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    shardings = batch_shardings(batch, mesh)
    if jax.process_count() == 1:
        return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def sharded_forward(model, mesh: Mesh, rules=DEFAULT_RULES, **options):
    """(run, params): `run(batch, hooks)` is the model's forward jitted over the mesh with sharded params."""
    params = shard_params(model.params, mesh, rules)

    @model.jit
    def _run(params, batch, hooks):
        return model.forward(params, batch, hooks, **options)

    def run(batch: dict, hooks=None):
        return _run(params, shard_batch(batch, mesh), ordered(hooks))

    return run, params
