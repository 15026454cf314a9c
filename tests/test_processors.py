"""`vlmjax.load_processor` resolves shipped models and directories; runtime code never imports the test fixtures."""

import json
import subprocess
import sys

import pytest

import vlmjax
from vlmjax import builtin


@pytest.mark.parametrize("name", ["llava-shapes", "qwen2-vl-shapes"])
def test_load_processor_reads_a_builtin_by_name_and_by_path(name):
    by_name = vlmjax.load_processor(f"builtin:{name}")
    by_path = vlmjax.load_processor(builtin.builtin_path(name))
    config = json.loads((builtin.builtin_path(name) / "config.json").read_text())
    image_token_id = config.get("image_token_id", config.get("image_token_index"))
    assert by_name.image_token_id == by_path.image_token_id == image_token_id
    assert by_name.tokenizer.get_vocab() == by_path.tokenizer.get_vocab()


def test_load_processor_names_the_builtin_models_on_a_typo():
    with pytest.raises(vlmjax.VlmJaxError, match="llava-shapes"):
        vlmjax.load_processor("builtin:llava-shape")


def test_runtime_modules_do_not_import_the_test_fixtures():
    code = ("import sys, vlmjax, vlmjax.cli, vlmjax.train, vlmjax.eval.run, vlmjax.verify;"
            "vlmjax.load_processor('builtin:qwen2-vl-shapes');"
            "print(sorted(m for m in sys.modules if m.startswith('vlmjax.testing')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
