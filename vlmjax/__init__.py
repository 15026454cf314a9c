"""vlmjax: vision-language models in JAX as pure functions, verified against HF, instrumented for research."""

from vlmjax.api import VLM, ModelOutput, load
from vlmjax.errors import VlmJaxError
from vlmjax.processors import load_processor

__all__ = ["VLM", "ModelOutput", "VlmJaxError", "load", "load_processor"]
