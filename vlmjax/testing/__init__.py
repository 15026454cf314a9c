"""Test fixtures: tiny randomly initialised HF checkpoints of each family (`vlmjax.testing.tiny`,
`tiny_llava_next`, `tiny_qwen2_vl`, `tiny_paligemma`), used by the tests, the benchmarks and `vlmjax verify --tiny`.
Runtime code never imports this package. Needs the `reference` extra (torch)."""
