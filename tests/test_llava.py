"""LLaVA family: parity with HF PyTorch (fp32, eager attention), conversion both ways, orbax, sharding, errors."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import vlmjax
from converters import hf as hf_conv
from converters.keymaps import canonical_key
from tests.family_fixtures import TOL, long_text, random_images
from vlmjax import cli
from vlmjax.errors import VlmJaxError
from vlmjax.verify import compare, load_hf_model, run_hf
from vlmjax.testing.tiny import make_tiny_llava

IMG = "<image>"


def _images(n, seed=0):
    sizes = [(80, 60), (40, 90), (56, 56), (70, 30)]
    return random_images([sizes[i % 4] for i in range(n)], seed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Build each tiny variant once: {variant: (path, processor)}."""
    cache = {}

    def get(variant, **kw):
        key = (variant, tuple(sorted(kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(variant)
            _, processor = make_tiny_llava(path, variant=variant, **kw)
            processor.tokenizer.padding_side = "left"
            cache[key] = (path, processor)
        return cache[key]

    return get


def _parity(path, inputs):
    model = vlmjax.load(path, progress=False)
    ours = model(**inputs, output_hidden_states=True, output_attentions=True)
    theirs = run_hf(load_hf_model(path), inputs)
    result = compare(ours, theirs)
    assert len(result.hidden_states) == model.config.text.num_layers + 1
    assert result.worst <= TOL, result.table()
    return result


PADDED_PAIR = [f"USER: {IMG} what is in the image ? ASSISTANT:",
               f"USER: {IMG} how many red circle are there in the box on the left ? yes or no ? ASSISTANT: the"]


@pytest.mark.parametrize("variant", ["mha", "gqa", "mistral", "full_last", "multi_layer", "tied", "rope_linear"])
def test_parity_left_padded_batch(tiny, variant):
    path, processor = tiny(variant)
    inputs = dict(processor(images=_images(2), text=PADDED_PAIR, return_tensors="np", padding=True))
    assert (inputs["attention_mask"][0] == 0).any(), "the batch must be left-padded"
    assert inputs["input_ids"].shape[1] > 16  # longer than the Mistral variant's sliding window
    _parity(path, inputs)


def test_parity_two_images_in_one_prompt(tiny):
    path, processor = tiny("gqa")
    text = [f"USER: {IMG} left and {IMG} right : what is the same ? ASSISTANT:"]
    inputs = dict(processor(images=_images(2), text=text, return_tensors="np"))
    _parity(path, inputs)


@pytest.mark.parametrize("variant", ["gqa", "mistral"])
def test_parity_long_prompt(tiny, variant):
    path, processor = tiny(variant)
    inputs = dict(processor(images=_images(1), text=[f"USER: {IMG} {long_text()} ? ASSISTANT:"], return_tensors="np"))
    assert inputs["input_ids"].shape[1] >= 500
    _parity(path, inputs)


def test_visual_metadata_from_ids(tiny):
    path, processor = tiny("gqa")
    inputs = dict(processor(images=_images(2), text=PADDED_PAIR, return_tensors="np", padding=True))
    model = vlmjax.load(path, progress=False)
    _, meta = model.prepare(inputs)
    ids = inputs["input_ids"]
    for s in range(2):
        np.testing.assert_array_equal(meta.positions(s), np.flatnonzero(ids[s] == model.config.image_token_id))
    assert meta.positions(0)[0] != meta.positions(1)[0]  # padding moves the image: positions are per sample
    assert meta.images[1].grid == (4, 4) and meta.grid_row[1, meta.positions(1)[-1]] == 3


def test_hf_round_trip_identical_logits(tiny, tmp_path):
    for variant in ("gqa", "tied"):
        path, processor = tiny(variant)
        model = vlmjax.load(path, progress=False)
        out_dir = hf_conv.save_hf(model.params, model.config, model.hf_config, tmp_path / variant, source_dir=path)
        if variant == "tied":
            assert "lm_head.weight" not in load_file(out_dir / "model.safetensors")
        inputs = dict(processor(images=_images(2), text=PADDED_PAIR, return_tensors="np", padding=True))
        original = run_hf(load_hf_model(path), inputs)["logits"]
        again = run_hf(load_hf_model(out_dir), inputs)["logits"]
        np.testing.assert_array_equal(original, again)


def test_sharded_save_and_old_key_layout(tiny, tmp_path):
    path, _ = tiny("gqa")
    model = vlmjax.load(path, progress=False)
    sharded = hf_conv.save_hf(model.params, model.config, model.hf_config, tmp_path / "sharded",
                              max_shard_bytes=200_000)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    assert any(k.startswith("model.language_model.") for k in load_file(sharded / next(
        iter(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))))
    # Rewrite to the pre-4.52 layout (language_model.model.*, vision_tower.vision_model.*, language_model.lm_head).
    old = tmp_path / "old"
    old.mkdir()
    tensors = load_file(path / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        k = canonical_key(k)  # newest layout first, whatever this transformers version saved
        for new, legacy in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                            ("model.vision_tower.", "vision_tower.vision_model."),
                            ("model.multi_modal_projector.", "multi_modal_projector.")):
            if k.startswith(new):
                k = legacy + k[len(new):]
        renamed[k] = v
    renamed["vision_tower.vision_model.embeddings.position_ids"] = np.arange(17)[None]  # a buffer old files carry
    save_file(renamed, old / "model.safetensors")
    shutil.copy(path / "config.json", old / "config.json")
    for candidate in (sharded, old):
        loaded = vlmjax.load(candidate, progress=False)
        for a, b in zip(jax_leaves(loaded.params), jax_leaves(model.params), strict=True):
            np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_orbax_bit_exact_and_cli_convert(tiny, tmp_path):
    path, processor = tiny("gqa")
    assert cli.main(["convert", str(path), str(tmp_path / "conv")]) == 0
    original = vlmjax.load(path, progress=False)
    converted = vlmjax.load(tmp_path / "conv")
    for a, b in zip(jax_leaves(original.params), jax_leaves(converted.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    inputs = dict(processor(images=_images(1), text=[PADDED_PAIR[0]], return_tensors="np"))
    np.testing.assert_array_equal(np.asarray(original(**inputs).logits), np.asarray(converted(**inputs).logits))
    bf16 = vlmjax.load(path, dtype="bfloat16", progress=False)
    logits = np.asarray(bf16(**inputs).logits, np.float32)
    assert str(bf16.dtype) == "bfloat16" and np.isfinite(logits).all()


def test_sharded_forward_matches_single_device(tiny):
    import jax

    from vlmjax.sharding import make_mesh, param_shardings, sharded_forward

    assert len(jax.devices()) == 8
    path, processor = tiny("gqa")
    model = vlmjax.load(path, progress=False)
    texts = PADDED_PAIR * 2
    inputs = dict(processor(images=_images(4), text=texts, return_tensors="np", padding=True))
    single = np.asarray(model(**inputs).logits)
    mesh = make_mesh(data=2, model=4)
    run, params = sharded_forward(model, mesh)
    q_spec = param_shardings(model.params, mesh)["text"]["layers"]["q"]["kernel"].spec
    assert tuple(q_spec) == (None, None, "model")
    assert len(params["text"]["layers"]["q"]["kernel"].sharding.device_set) == 8
    batch, _ = model.prepare(inputs)
    sharded = np.asarray(run(batch)["logits"])
    assert np.abs(sharded - single).max() <= 1e-5
    bad = {k: v[:3] for k, v in batch.items() if k != "pixel_values"}
    with pytest.raises(VlmJaxError, match="cannot be split over the mesh"):
        run(bad)


def test_cli_verify_and_info(tmp_path, capsys):
    assert cli.main(["verify", "--tiny", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "logits" in out
    assert cli.main(["info", str(tmp_path / "m")]) == 0
    assert "visual tokens for one" in capsys.readouterr().out


# -- bad input ----------------------------------------------------------------------------------------------------


def test_error_missing_config_or_weights(tiny, tmp_path):
    with pytest.raises(VlmJaxError, match="does not exist.*no model hub"):
        vlmjax.load("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(VlmJaxError, match="No config.json"):
        vlmjax.load(tmp_path)
    path, _ = tiny("gqa")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    with pytest.raises(VlmJaxError, match=r"No \*.safetensors"):
        vlmjax.load(tmp_path)


def test_error_unsupported_model_type(tiny, tmp_path):
    path, _ = tiny("gqa")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "blip_2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VlmJaxError, match="Unsupported model_type 'blip_2'"):
        vlmjax.load(tmp_path)


@pytest.mark.parametrize("change, message", [
    ("drop", r"missing tensors: \['model.language_model.layers.1.mlp.up_proj.weight'\]"),
    ("extra", r"unexpected tensors: \['model.language_model.layers.0.mlp.extra.weight'\]"),
    ("shape", r"Shape mismatch for model.language_model.layers.0.mlp.up_proj.weight"),
])
def test_error_tensor_problems(tiny, tmp_path, change, message):
    path, _ = tiny("gqa")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    tensors = {canonical_key(k): v for k, v in load_file(path / "model.safetensors").items()}
    if change == "drop":
        del tensors["model.language_model.layers.1.mlp.up_proj.weight"]
    elif change == "extra":
        tensors["model.language_model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    else:
        tensors["model.language_model.layers.0.mlp.up_proj.weight"] = np.zeros((5, 64), np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(VlmJaxError, match=message):
        vlmjax.load(tmp_path, progress=False)


def test_error_image_count_mismatch(tiny):
    path, processor = tiny("gqa")
    model = vlmjax.load(path, progress=False)
    inputs = dict(processor(images=_images(2), text=PADDED_PAIR, return_tensors="np", padding=True))
    with pytest.raises(VlmJaxError, match=r"pixel_values holds 1 image\(s\) but the input ids have image tokens for 2"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:1]})
    ids = inputs["input_ids"].copy()
    ids[0, np.flatnonzero(ids[0] == model.config.image_token_id)[0]] = 5
    with pytest.raises(VlmJaxError, match="not a multiple of the 16 tokens"):
        model(**{**inputs, "input_ids": ids})
    with pytest.raises(VlmJaxError, match="pixel_values must have shape"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, :, :28]})
    with pytest.raises(VlmJaxError, match="outside the vocabulary"):
        model(**{**inputs, "input_ids": inputs["input_ids"] + 1000})


def test_torch_inputs_and_vision_tower_alone(tiny):
    """Processor outputs as torch tensors work as numpy ones do; the vision tower + projector output alone equals
    HF's get_image_features."""
    import torch

    path, processor = tiny("gqa")
    model = vlmjax.load(path, progress=False)
    as_torch = processor(images=_images(2), text=PADDED_PAIR, return_tensors="pt", padding=True)
    as_numpy = {k: v.numpy() for k, v in as_torch.items()}
    ours = model(**as_torch)
    np.testing.assert_array_equal(np.asarray(ours.logits), np.asarray(model(**as_numpy).logits))
    with torch.no_grad():
        hf = load_hf_model(path).model.get_image_features(pixel_values=as_torch["pixel_values"]).pooler_output
    hf = torch.stack(list(hf)).numpy()
    assert np.abs(np.asarray(ours["image_features"]) - hf).max() <= TOL
