"""vlmjax: vision-language models in JAX as pure functions, verified against HF, instrumented for research."""

import os

# XLA's concurrency-optimised CPU scheduler deadlocks on some executables that run several SVDs side by side (found
# with Noise-QKV and UpdateGeometry's records in one forward on 2 cores: device_get never returns). The flag only
# acts if set before JAX starts its backend, so it is added at import, unless the user set it.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER_FLAG}=false".strip()

from vlmjax.api import VLM, ModelOutput, load
from vlmjax.errors import VlmJaxError
from vlmjax.processors import load_processor

__all__ = ["VLM", "ModelOutput", "VlmJaxError", "load", "load_processor"]
