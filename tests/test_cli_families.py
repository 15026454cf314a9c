"""`vlmjax verify`, `vlmjax info` and `vlmjax convert` on the LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, PaliGemma and
InstructBLIP families (the processor comes from the checkpoint directory, as on a user's real checkpoint)."""

import jax
import numpy as np
import pytest

import vlmjax
from vlmjax import cli
from vlmjax.testing.tiny_instructblip import make_tiny_instructblip
from vlmjax.testing.tiny_llava_next import make_tiny_llava_next
from vlmjax.testing.tiny_paligemma import make_tiny_paligemma
from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl
from vlmjax.testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl


@pytest.mark.parametrize("make", [make_tiny_llava_next, make_tiny_qwen2_vl, make_tiny_qwen2_5_vl, make_tiny_paligemma,
                                  make_tiny_instructblip])
def test_verify_info_and_convert(make, tmp_path, capsys):
    path = tmp_path / "hf"
    make(path)
    assert cli.main(["verify", str(path)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "visual tokens for one 80x60 (height x width) image" in out and "parameters:" in out
    assert cli.main(["convert", str(path), str(tmp_path / "converted")]) == 0
    converted, original = vlmjax.load(tmp_path / "converted"), vlmjax.load(path, progress=False)
    assert converted.config == original.config
    for a, b in zip(jax.tree.leaves(converted.params), jax.tree.leaves(original.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
