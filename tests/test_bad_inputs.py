"""Bad inputs, as a new user would give them, through the API, the `vlmjax` command and the studies: each is refused
with a VlmJaxError (or exit status 2) whose message names the offending input; none produces a number. Resumes are
refused when the records on disk came from another model, settings or data; non-finite values are traced to the
first site, layer and sample where they appear."""

import json
import re
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import AutoProcessor

import vlmjax
from vlmjax import cli, interventions as iv, probes
from vlmjax.data.shapes import generate_dataset
from vlmjax.errors import VlmJaxError
from vlmjax.eval.records import ResultsWriter
from vlmjax.eval.run import evaluate_pope, load_shapes_pope
from vlmjax.generate import generate
from vlmjax.hooks import Capture
from vlmjax import load_processor
from vlmjax.inputs import image_placeholder
from vlmjax.testing.tiny import make_tiny_llava

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # the studies are scripts
import fusion_layers  # noqa: E402
import neglect_zone  # noqa: E402
import reliability_probes  # noqa: E402

LAYERS = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny LLaVA (4 decoder layers), a second one with other weights, and a small shapes-world dataset."""
    root = tmp_path_factory.mktemp("bad")
    make_tiny_llava(root / "model", variant="gqa", text_layers=LAYERS)
    make_tiny_llava(root / "other", variant="gqa", text_layers=LAYERS, seed=1)
    generate_dataset(str(root / "data"), 10, seed=5, image_size=56, progress=False)
    return root


@pytest.fixture(scope="module")
def model(root):
    return vlmjax.load(root / "model", progress=False)


@pytest.fixture(scope="module")
def inputs(root):
    processor = AutoProcessor.from_pretrained(str(root / "model"))
    processor.tokenizer.padding_side = "left"
    images = [Image.new("RGB", (40, 50), (20, 30, 40)), Image.new("RGB", (60, 40), (200, 10, 10))]
    return dict(processor(images=images, text=["USER: <image> what ? ASSISTANT:"] * 2, return_tensors="np",
                          padding=True))


def _copy(root, tmp_path, name="copy"):
    return Path(shutil.copytree(root / "model", tmp_path / name))


# ---------------------------------------------------------------------------------------------------------------------
# The API: hooks, inputs and decoding arguments


def _hooks(model):
    heads, hidden = model.config.text.num_heads, model.config.text.hidden_size
    inter = model.config.text.intermediate_size
    return {
        "not a hook": ({"x": 2.0}, "'x'.*float"),
        "hooks not a mapping": ([iv.AttentionBias.on_layers(LAYERS, [1])], "mapping.*list"),
        "capture typo": ({"c": Capture(sites=frozenset({"resid_psot"}))}, "'resid_psot'.*Did you mean 'resid_post'"),
        "capture full name": ({"c": Capture(sites=frozenset({"blocks.1.resid_post"}))}, "'blocks.1.resid_post'.*capture"),
        "capture layer": ({"c": Capture(sites=frozenset({"resid_post"}), only_layers=(9,))}, "only_layers holds 9"),
        "hidden states typo": ({"h": probes.HiddenStates(site="attn.patern")}, "'attn.patern'.*'attn.pattern'"),
        "hidden states position": ({"h": probes.HiddenStates(positions=jnp.full((2, 1), 999))}, "positions.*999"),
        "negative position": ({"h": probes.HiddenStates(positions=jnp.full((2, 1), -1))}, "positions.*-1"),
        "lens target": ({"lens": probes.LogitLens.from_model(model, target_ids=[[10**6]])}, "target_ids.*1000000"),
        "lens position": ({"lens": probes.LogitLens.from_model(model, positions=[[500]] * 2)}, "positions.*500"),
        "query index": ({"map": probes.LastQueryVisualMap(query_index=jnp.asarray([3, 777]))}, "query_index.*777"),
        "head mask width": ({"hm": iv.HeadMask(jnp.ones((LAYERS, heads + 1)))}, rf"'keep'.*\({LAYERS}, {heads + 1}\)"),
        "head mask layers": ({"hm": iv.HeadMask(jnp.ones((LAYERS + 2, heads)))}, rf"'keep'.*\({LAYERS + 2}, {heads}\)"),
        "ablation width": ({"ab": iv.NeuronAblation(jnp.ones((LAYERS, inter + 3)), jnp.zeros((LAYERS, inter + 3)))},
                           rf"'keep'.*\({LAYERS}, {inter + 3}\)"),
        "ablation residual width": ({"ab": iv.NeuronAblation.zero(LAYERS, inter, {1: [0]}, site="resid_post")},
                                    rf"'keep'.*{hidden}"),
        "ablation site typo": ({"ab": iv.NeuronAblation(jnp.ones((LAYERS, inter)), jnp.zeros((LAYERS, inter)),
                                                        site="mlp.hiden")}, "'mlp.hiden'.*'mlp.hidden'"),
        "region mask shape": ({"heads": probes.VisualHeadAttention(region_mask=jnp.ones((2, 5), bool))},
                              r"'region_mask' has shape \(2, 5\)"),
        "nan bias": ({"viar": iv.AttentionBias(jnp.asarray([0, np.nan, 0, 0], jnp.float32))}, "'viar'.*'bias'.*NaN"),
        "bias length": ({"viar": iv.AttentionBias(jnp.ones(LAYERS + 1))}, "'viar'.*'bias'.*leading axis of 4"),
    }


CASES = ["not a hook", "hooks not a mapping", "capture typo", "capture full name", "capture layer",
         "hidden states typo", "hidden states position", "negative position", "lens target", "lens position",
         "query index", "head mask width", "head mask layers", "ablation width", "ablation residual width",
         "ablation site typo", "region mask shape", "nan bias", "bias length"]


@pytest.mark.parametrize("case", CASES)
def test_bad_hooks_are_refused_before_tracing(model, inputs, case):
    hooks, message = _hooks(model)[case]
    with pytest.raises(VlmJaxError, match=message):
        model(**inputs, hooks=hooks)


def test_bad_hooks_are_refused_by_generate(model, inputs):
    with pytest.raises(VlmJaxError, match="'resid_psot'"):
        generate(model, inputs, 2, hooks={"c": Capture(sites=frozenset({"resid_psot"}))})


def _last_token(ids, token):
    ids = ids.copy()
    ids[:, -1] = token
    return ids


@pytest.mark.parametrize("change, message", [
    (lambda x: {**x, "input_ids": _last_token(x["input_ids"], 10**6)}, "max 1000000"),
    (lambda x: {**x, "input_ids": _last_token(x["input_ids"], -5)}, "min -5"),
    (lambda x: {**x, "attention_mask": x["attention_mask"][:, 1:]}, "attention_mask has shape"),
    (lambda x: {**x, "pixel_values": x["pixel_values"][:1]}, "pixel_values holds 1 image"),
    (lambda x: {**x, "pixel_valus": x["pixel_values"]}, "pixel_valus"),
])
def test_bad_processor_outputs_are_refused(model, inputs, change, message):
    with pytest.raises(VlmJaxError, match=message):
        model(**change(inputs))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-3), "max_new_tokens.*-3"),
    (dict(max_new_tokens=0), "max_new_tokens.*0"),
    (dict(max_new_tokens=2.5), "max_new_tokens.*2.5"),
    (dict(max_new_tokens=2, eos_token_id=10**6), "eos_token_id 1000000"),
    (dict(max_new_tokens=2, pad_token_id=-1), "pad_token_id -1"),
    (dict(max_new_tokens=2, do_sample=True, key=None), "PRNG key"),
    (dict(max_new_tokens=2, temperature=0.0), "temperature"),
])
def test_bad_decoding_arguments_are_refused(model, inputs, kwargs, message):
    with pytest.raises(VlmJaxError, match=message):
        generate(model, inputs, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite values: traced to the first site, layer and sample


def test_nan_pixels_are_traced_to_the_vision_embedding_of_their_image(model, inputs):
    assert np.isfinite(model(**inputs, check_finite=True).logits).all()  # clean inputs pass, nothing extra returned
    pixels = inputs["pixel_values"].copy()
    pixels[1, 0, 5, 5] = np.nan
    with pytest.raises(VlmJaxError, match=r"site vision\.embed \(image \[1\]\)"):
        model(**{**inputs, "pixel_values": pixels}, check_finite=True)


def test_an_infinite_bias_is_traced_to_its_layer_and_site(model, inputs):
    bias = iv.AttentionBias.on_layers(LAYERS, [2], bias=float("inf"))
    with pytest.raises(VlmJaxError, match=r"site blocks\.2\.attn\.scores \(layer 2, sample \[0, 1\]\)"):
        model(**inputs, hooks={"viar": bias}, check_finite=True)
    assert not np.isfinite(model(**inputs, hooks={"viar": bias}).logits).all()  # the check is what catches it


def test_a_minus_infinite_score_is_a_ruled_out_one_not_an_error(model, inputs):
    out = model(**inputs, hooks={"viar": iv.AttentionBias.on_layers(LAYERS, [2], bias=-float("inf"))},
                check_finite=True)
    assert np.isfinite(out.logits).all()


def test_qwen2_vl_packed_patches_pass_clean_and_name_nan_pixels():
    model = vlmjax.load("builtin:qwen2-vl-shapes", progress=False)
    processor = load_processor(model.path)
    text = f"USER: {image_placeholder(processor)} is there a red circle ? ASSISTANT:"
    inputs = dict(processor(images=[Image.new("RGB", (64, 64), (9, 90, 9))], text=[text], return_tensors="np"))
    assert np.isfinite(model(**inputs, check_finite=True).logits).all()
    pixels = inputs["pixel_values"].copy()
    pixels[-1, -1] = np.nan
    with pytest.raises(VlmJaxError, match=r"site vision\.embed \(image \[0\]\)"):
        model(**{**inputs, "pixel_values": pixels}, check_finite=True)


def test_the_evaluator_refuses_nan_logits_naming_the_site(root, tmp_path):
    model = vlmjax.load(root / "model", progress=False)
    processor = AutoProcessor.from_pretrained(str(root / "model"))
    records = load_shapes_pope(root / "data", limit=1)
    bias = iv.AttentionBias.on_layers(LAYERS, [1], bias=float("inf"))
    with pytest.raises(VlmJaxError, match=r"blocks\.1\.attn\.scores \(layer 1.*questions"):
        evaluate_pope(model, processor, records, tmp_path / "r.jsonl", batch_size=3, hooks={"viar": bias},
                      progress=False)
    assert (tmp_path / "r.jsonl").read_text() == ""  # no number written


def test_a_nan_weight_in_a_checkpoint_is_named_at_load(root, tmp_path):
    path = _copy(root, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    key = next(k for k in tensors if "layers.2.self_attn.q_proj.weight" in k)
    tensors[key][0, 0] = np.nan
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VlmJaxError, match=r"text/layers/q/kernel at index \[2, 0, 0\]"):
        vlmjax.load(path, progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Loading: dtypes and broken checkpoints


@pytest.mark.parametrize("alias, dtype", [("fp32", "float32"), ("float32", "float32"), ("bf16", "bfloat16"),
                                          ("bfloat16", "bfloat16"), ("fp16", "float16"), ("float16", "float16"),
                                          (jnp.bfloat16, "bfloat16"), (np.float32, "float32")])
def test_documented_dtypes_and_aliases_load(root, alias, dtype):
    assert vlmjax.load(root / "model", dtype=alias, progress=False).dtype == dtype


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8", np.int32, "float"])
def test_other_dtypes_are_refused(root, dtype):
    with pytest.raises(VlmJaxError, match="Unsupported dtype .*(float64|int8|fp8|int32|float)"):
        vlmjax.load(root / "model", dtype=dtype, progress=False)


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "config.json").write_text('{"model_type": "llava",'), r"config\.json is not valid JSON"),
    (lambda p: (p / "config.json").write_text("[1, 2]"), r"config\.json holds a list"),
    (lambda p: (p / "model.safetensors").write_bytes(b""), r"model\.safetensors is not a readable.*0 bytes"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:3000]),
     r"model\.safetensors is not a readable.*truncated"),
    (lambda p: (p / "model.safetensors").unlink(), r"No \*\.safetensors"),
    (lambda p: (p / "config.json").unlink(), "No config.json"),
])
def test_broken_checkpoints_name_the_file(root, tmp_path, damage, message):
    path = _copy(root, tmp_path)
    damage(path)
    with pytest.raises(VlmJaxError, match=message):
        vlmjax.load(path, progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Records files


def test_a_corrupt_middle_line_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\n{"id": 2, oops\n{"id": 3}\n')
    with pytest.raises(VlmJaxError, match="line 2 .*Fix or delete that line.*--overwrite"):
        ResultsWriter(str(path)).open()


def test_a_non_finite_record_is_never_written(tmp_path):
    with ResultsWriter(str(tmp_path / "r.jsonl")) as writer:
        with pytest.raises(VlmJaxError, match=r"Record 7 .*\['p_yes'\]"):
            writer.write({"id": 7, "p_yes": float("nan"), "label": "yes"})
    assert (tmp_path / "r.jsonl").read_text() == ""


@pytest.mark.parametrize("kwargs, message", [(dict(batch_size=0), "batch_size.*0"), (dict(batch_size=-2), "-2"),
                                             (dict(max_new_tokens=0), "max_new_tokens")])
def test_bad_evaluation_arguments_are_refused(root, model, tmp_path, kwargs, message):
    processor = AutoProcessor.from_pretrained(str(root / "model"))
    with pytest.raises(VlmJaxError, match=message):
        evaluate_pope(model, processor, load_shapes_pope(root / "data", limit=1), tmp_path / "r.jsonl", **kwargs)
    with pytest.raises(VlmJaxError, match="No questions"):
        evaluate_pope(model, processor, [], tmp_path / "r.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# The command line: exit status 2 and a message naming the input


def _refused(argv, message, capsys):
    """`vlmjax argv` exits with status 2 (argparse's or ours) and stderr matches `message`."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert re.search(message, err, re.S), err


def _cli_cases(root, tmp_path):
    model, data, out = str(root / "model"), str(root / "data"), str(tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "not_model").mkdir()
    no_processor = _copy(root, tmp_path, "no_processor")
    (no_processor / "processor_config.json").unlink()
    corrupt = _copy(root, tmp_path, "corrupt")
    (corrupt / "config.json").write_text('{"model_type": "llava", "text_config": {')
    eval_ = ["eval", "--model", model, "--data", data, "--out", out]
    return {
        "limit -1": (eval_ + ["--limit", "-1"], "--limit: must be a positive integer, got '-1'"),
        "limit 0": (eval_ + ["--limit", "0"], "--limit: must be a positive integer, got '0'"),
        "batch size 0": (eval_ + ["--batch-size", "0"], "--batch-size: .*'0'"),
        "batch size -4": (eval_ + ["--batch-size", "-4"], "--batch-size: .*'-4'"),
        "n images 0": (eval_ + ["--n-images", "0"], "--n-images: .*'0'"),
        "seed not a number": (eval_ + ["--seed", "abc"], "--seed: .*'abc'"),
        "unknown split": (eval_ + ["--splits", "randm"], "--splits: invalid choice: 'randm'"),
        "unknown null image": (eval_ + ["--null-image", "white"], "--null-image: invalid choice: 'white'"),
        "empty pope file": (["eval", "--model", model, "--pope", str(tmp_path / "empty.jsonl"), "--images", data,
                             "--out", out], "empty.jsonl holds no questions"),
        "pope without images": (["eval", "--pope", str(tmp_path / "empty.jsonl"), "--out", out], "--images"),
        "missing pope file": (["eval", "--pope", str(tmp_path / "nope.jsonl"), "--images", data, "--out", out],
                              "nope.jsonl does not exist"),
        "out is a file": (["eval", "--model", model, "--out", str(tmp_path / "a_file")], "a_file is a file"),
        "out read-only": (["eval", "--model", model, "--out", "/sys/vlmjax-out"], "/sys/vlmjax-out cannot be written"),
        "data does not exist": (["eval", "--model", model, "--data", str(tmp_path / "typo"), "--out", out],
                                "typo does not exist"),
        "data is a model": (["eval", "--model", model, "--data", model, "--out", out],
                            "model is not a shapes-world dataset.*holds a model"),
        "data is a file": (["eval", "--model", model, "--data", str(tmp_path / "a_file"), "--out", out],
                           "a_file is a file"),
        "model does not exist": (["eval", "--model", str(tmp_path / "nomodel"), "--data", data, "--out", out],
                                 "nomodel does not exist"),
        "unknown builtin": (["eval", "--model", "builtin:llava-shapez", "--out", out], "'llava-shapez'"),
        "convert dtype float64": (["convert", model, str(tmp_path / "c"), "--dtype", "float64"], "'float64'"),
        "convert dtype int8": (["convert", model, str(tmp_path / "c"), "--dtype", "int8"], "'int8'"),
        "convert into a model": (["convert", model, str(root / "other")], "other is not empty.*--overwrite"),
        "convert a non-model": (["convert", str(tmp_path / "not_model"), str(tmp_path / "c")],
                                "No config.json in .*not_model"),
        "verify a non-model": (["verify", str(tmp_path / "not_model")], "No config.json in .*not_model"),
        "verify without processor": (["verify", str(no_processor)], "no_processor has a config.json but no "
                                                                    "processor files"),
        "verify unknown variant": (["verify", "--tiny", "--variant", "bogus"], "--variant: invalid choice: 'bogus'"),
        "verify tolerance": (["verify", model, "--tolerance", "-1"], "--tolerance: .*'-1'"),
        "info on a non-model": (["info", str(tmp_path / "not_model")], "No config.json in .*not_model"),
        "info corrupt config": (["info", str(corrupt)], r"corrupt/config\.json is not valid JSON"),
    }


CLI_CASES = ["limit -1", "limit 0", "batch size 0", "batch size -4", "n images 0", "seed not a number",
             "unknown split", "unknown null image", "empty pope file", "pope without images", "missing pope file",
             "out is a file", "out read-only", "data does not exist", "data is a model", "data is a file",
             "model does not exist", "unknown builtin", "convert dtype float64", "convert dtype int8",
             "convert into a model", "convert a non-model", "verify a non-model", "verify without processor",
             "verify unknown variant", "verify tolerance", "info on a non-model", "info corrupt config"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_the_command_line_refuses_with_status_2(root, tmp_path, capsys, case):
    argv, message = _cli_cases(root, tmp_path)[case]
    before = sorted(p.name for p in (root / "model").iterdir())
    _refused(argv, message, capsys)
    assert sorted(p.name for p in (root / "model").iterdir()) == before  # nothing written into the model
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_convert_replaces_a_target_only_with_overwrite(root, tmp_path, capsys):
    target = shutil.copytree(root / "other", tmp_path / "target")
    assert cli.main(["convert", str(root / "model"), str(target), "--dtype", "bf16", "--overwrite"]) == 0
    converted = vlmjax.load(target, progress=False)
    assert converted.dtype == jnp.bfloat16 and not (target / "model.safetensors").exists()  # the old files are gone
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging directory left


# ---------------------------------------------------------------------------------------------------------------------
# Resumes: the records on disk must come from the same model, settings and data


def test_eval_resume_refuses_another_model_or_data_and_overwrite_starts_again(root, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", str(root / "model"), "--data", str(root / "data"), "--limit", "1", "--batch-size",
            "3", "--out", str(out)]
    assert cli.main(argv) == 0
    first = (out / "results.jsonl").read_text()
    assert cli.main(argv) == 0 and (out / "results.jsonl").read_text() == first  # the same run resumes
    capsys.readouterr()

    other_model = [a if a != str(root / "model") else str(root / "other") for a in argv]
    _refused(other_model, r"different model: model\.path: .*model.* on disk, .*other.* now.*--overwrite", capsys)
    generate_dataset(str(tmp_path / "data2"), 10, seed=6, image_size=56, progress=False)
    other_data = [a if a != str(root / "data") else str(tmp_path / "data2") for a in argv]
    _refused(other_data, r"different data: data\.hash.*data\.path", capsys)
    assert (out / "results.jsonl").read_text() == first  # nothing was added

    assert cli.main(other_model + ["--overwrite"]) == 0
    assert (out / "results.jsonl").read_text() != first
    assert json.loads((out / "results.fingerprint.json").read_text())["model"]["path"] == str(root / "other")


def test_eval_resume_refuses_other_settings(root, model, tmp_path):
    processor = AutoProcessor.from_pretrained(str(root / "model"))
    records = load_shapes_pope(root / "data", limit=1)
    path = tmp_path / "r.jsonl"
    evaluate_pope(model, processor, records, path, batch_size=3, progress=False, data=root / "data")
    with pytest.raises(VlmJaxError, match=r"different settings: settings\.max_new_tokens: 3 on disk, 5 now"):
        evaluate_pope(model, processor, records, path, batch_size=3, max_new_tokens=5, data=root / "data")
    with pytest.raises(VlmJaxError, match=r"different settings: settings\.hooks"):
        evaluate_pope(model, processor, records, path, batch_size=3, data=root / "data",
                      hooks={"viar": iv.AttentionBias.on_layers(LAYERS, [1], 1.0)})
    with pytest.raises(VlmJaxError, match=r"different model: model\.dtype"):
        evaluate_pope(vlmjax.load(root / "model", dtype="bf16", progress=False), processor, records, path,
                      batch_size=3, data=root / "data")


def test_generated_data_must_match_the_requested_set(root, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    generate_dataset(str(out / "data"), 10, seed=1234, image_size=56, progress=False)
    _refused(["eval", "--model", str(root / "model"), "--n-images", "12", "--out", str(out)],
             "data was generated with n_images 10, not n_images 12.*--overwrite", capsys)


# ---------------------------------------------------------------------------------------------------------------------
# The studies: config files and resumes


def _study(module, tmp_path, capsys, config: dict, *flags):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config) if isinstance(config, dict) else config)
    try:
        status = module.main(["--config", str(path), *flags])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def _config(module, root, tmp_path, **changes):
    config = json.loads(module.CONFIG.read_text())
    config.update(model=str(root / "model"), data=str(root / "data"), out=str(tmp_path / "study"),
                  question_files={"pope_test_random": 1, "pope_test_popular": 1, "pope_test_adversarial": 1},
                  batch_size=3)
    config.update(changes)
    return config


STUDY_CASES = [
    (neglect_zone, dict(batch_sise=4), "Unknown config key 'batch_sise'. Did you mean 'batch_size'"),
    (neglect_zone, dict(biases=[]), "'biases' is an empty list"),
    (neglect_zone, dict(biases=[0.0, float("nan")]), "'biases' holds nan"),
    (neglect_zone, dict(biases="3.0"), "'biases' must be a list"),
    (neglect_zone, dict(zone=[1, 99]), "'zone' holds layer 99.*0..3"),
    (neglect_zone, dict(batch_size=0), "'batch_size' must be a positive integer, got 0"),
    (neglect_zone, dict(null_image=7), "'null_image' must be a str"),
    (neglect_zone, dict(out="/sys/vlmjax-study"), "out /sys/vlmjax-study cannot be written"),
    (fusion_layers, dict(review_layer=12), "'review_layer' holds layer 12"),
    (fusion_layers, dict(soft_mask_scale=float("inf")), "'soft_mask_scale' holds inf"),
    (reliability_probes, dict(map_layer=-1), "'map_layer' holds layer -1"),
    (reliability_probes, dict(model=5), "'model' must be a str or null, got 5"),
]


@pytest.mark.parametrize("module, changes, message", STUDY_CASES)
def test_study_configs_are_checked(root, tmp_path, capsys, module, changes, message):
    status, err = _study(module, tmp_path, capsys, _config(module, root, tmp_path, **changes))
    assert status == 2 and re.search(message, err), err
    assert not list((tmp_path / "study").glob("*.jsonl"))


def test_study_config_files_are_checked(root, tmp_path, capsys):
    config = _config(neglect_zone, root, tmp_path)
    del config["biases"]
    status, err = _study(neglect_zone, tmp_path, capsys, config)
    assert status == 2 and "lacks the required key(s) ['biases']" in err
    status, err = _study(neglect_zone, tmp_path, capsys, "{not json")
    assert status == 2 and "config.json is not valid JSON" in err
    status, err = _study(neglect_zone, tmp_path, capsys, "[1, 2]")
    assert status == 2 and "holds a list" in err
    status, err = _study(neglect_zone, tmp_path, capsys, _config(neglect_zone, root, tmp_path), "--n-images", "0")
    assert status == 2 and "--n-images: must be a positive integer, got '0'" in err
    status, err = _study(neglect_zone, tmp_path, capsys, _config(neglect_zone, root, tmp_path), "--questions", "-1")
    assert status == 2 and "--questions must be 0 (all) or a positive count, got -1" in err
    status = neglect_zone.main(["--config", str(tmp_path / "missing.json")])
    assert status == 2 and "missing.json is not a file" in capsys.readouterr().err


def test_a_study_rerun_with_another_bias_is_refused(root, tmp_path, capsys):
    config = _config(neglect_zone, root, tmp_path, biases=[0.0, 3.0])
    status, _ = _study(neglect_zone, tmp_path, capsys, config)
    assert status == 0 and len((tmp_path / "study" / "records.jsonl").read_text().splitlines()) == 3
    status, err = _study(neglect_zone, tmp_path, capsys, {**config, "biases": [0.0, 9.0]})
    assert status == 2, err
    assert re.search(r"different settings: settings\.biases: \[0\.0, 3\.0\] on disk, \[0\.0, 9\.0\] now.*--overwrite",
                     err), err
    status, err = _study(neglect_zone, tmp_path, capsys, config, "--model", str(root / "other"))
    assert status == 2 and "different model" in err


def test_a_study_phase_names_where_its_logits_stop_being_finite(root, tmp_path):
    """The studies score logits through AnswerScorer; non-finite ones make run_phase locate the first site of the
    plain forward (here a NaN weight of layer 2), or say that the study's intervention made them overflow."""
    import copy

    from experiments import common

    model = vlmjax.load(root / "model", progress=False)
    processor = load_processor(model.path)
    processor.tokenizer.padding_side = "left"
    questions = common.read_study_set(root / "data", {"pope_test_random": 2}, 0)
    scorer = common.AnswerScorer(processor.tokenizer, questions)

    def phase(net, path, overflow=False):
        def compute(chunk, inputs, repeat):
            logits = np.asarray(net(**inputs, logits="last").logits[:, -1])
            scores = scorer(logits * np.inf if overflow else logits, chunk)
            return [common.score_rows(scores, i) for i in range(len(chunk))]

        return common.run_phase(net, path, processor, questions, 2, "phase", compute)

    broken = copy.copy(model)
    broken.params = {**model.params, "text": {**model.params["text"], "layers": {
        **model.params["text"]["layers"], "q": {**model.params["text"]["layers"]["q"],
                                                "kernel": model.params["text"]["layers"]["q"]["kernel"].at[2].set(np.nan)}}}}
    with pytest.raises(VlmJaxError, match=r"blocks\.2\.attn\.q .*questions \["):
        phase(broken, tmp_path / "broken.jsonl")
    with pytest.raises(VlmJaxError, match=r"under this study's intervention are not finite \(questions \[.*overflow"):
        phase(model, tmp_path / "overflow.jsonl", overflow=True)
    assert len(phase(model, tmp_path / "clean.jsonl")) == len(questions)
