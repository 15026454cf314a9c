"""One process of a 2-process run (tests/test_distributed.py launches two): 4 simulated CPU devices each, one global
(data 2, model 4) mesh over both, set up from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID the way
one command per host would be. Loads the model straight into the mesh (each process reads its share), feeds its
own rows of the global batch, runs a probed forward and a 4-value sweep, and process 0 writes the gathered results.

Usage: python tests/distributed_worker.py MODEL_DIR INPUTS.npz OUT.npz
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vlmjax.sharding import initialize_distributed, make_mesh, shard_batch, sharded_forward  # noqa: E402

initialize_distributed()  # before anything touches the backend
jax.config.update("jax_default_matmul_precision", "highest")

import vlmjax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from vlmjax import interventions as iv  # noqa: E402
from vlmjax.probes import VisualAttention  # noqa: E402
from vlmjax.sweep import make_sweep  # noqa: E402

SWEEP_VALUES = np.linspace(0.0, 3.0, 4, dtype=np.float32)


def main(model_dir: str, inputs_file: str, out_file: str) -> None:
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = make_mesh(data=2, model=4)
    model = vlmjax.load(model_dir, mesh=mesh, progress=False)
    inputs = dict(np.load(inputs_file))
    rows = len(inputs["input_ids"]) // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    batch, _ = model.prepare({k: v[mine] for k, v in inputs.items()})  # this process's rows (and their images)

    run, params = sharded_forward(model, mesh, logits="all")
    out = run(batch, {"visual": VisualAttention()})
    layers = model.num_layers["blocks"]
    zone = range(layers // 3, layers)
    flags = np.asarray(iv.layer_flags(layers, zone), np.float32)
    sweep = make_sweep(model, lambda v: {"viar": iv.AttentionBias(v * flags)}, first_layer=zone[0])
    swept = sweep(params, shard_batch(batch, mesh), SWEEP_VALUES)

    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    results = {"logits": gather(out["logits"]), "sweep_logits": gather(swept["logits"])}
    results.update({f"visual/{k}": gather(v) for k, v in out["hooks"]["visual"]["attn.pattern"].items()})
    if jax.process_index() == 0:
        np.savez(out_file, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
