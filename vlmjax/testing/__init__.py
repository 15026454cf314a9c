"""Test fixtures: tiny randomly initialised HF checkpoints of each family (`vlmjax.testing.tiny` for LLaVA, with the
decoder, CLIP tower and saving the other builders share; `tiny_llava_next`, `tiny_qwen2_vl` with the builder
`tiny_qwen2_5_vl` uses too, `tiny_paligemma`, `tiny_instructblip`), used by the tests, the benchmarks and
`vlmjax verify --tiny`. Runtime code never imports this package. Needs the `reference` extra (torch)."""
