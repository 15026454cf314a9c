"""`vlmjax verify` and `vlmjax info` on the LLaVA-NeXT, Qwen2-VL and InstructBLIP families (the processor comes from the
checkpoint directory, as on a user's real checkpoint)."""

import pytest

from vlmjax import cli
from vlmjax.testing.tiny_instructblip import make_tiny_instructblip
from vlmjax.testing.tiny_llava_next import make_tiny_llava_next
from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl
from vlmjax.testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl


@pytest.mark.parametrize("make", [make_tiny_llava_next, make_tiny_qwen2_vl, make_tiny_qwen2_5_vl, make_tiny_instructblip])
def test_verify_and_info(make, tmp_path, capsys):
    make(tmp_path)
    assert cli.main(["verify", str(tmp_path)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert cli.main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "visual tokens for one 80x60 (height x width) image" in out and "parameters:" in out
