"""The shipped models (vlmjax/builtin): loaded by name, they agree with HF PyTorch on their trained weights, decode
greedily as HF `generate` does, and answer held-out POPE-style questions from the image (chance without it)."""

import json

import jax
import numpy as np
import pytest
import torch

import vlmjax
from vlmjax import builtin, cli, load_processor, train
from vlmjax.data.shapes import generate_dataset
from vlmjax.eval.pope import score_pope
from vlmjax.eval.run import DEFAULT_PROMPT, load_shapes_pope
from vlmjax.generate import generate
from vlmjax.inputs import image_placeholder
from vlmjax.verify import load_hf_model

BUILTINS = ("llava-shapes", "qwen2-vl-shapes", "llava-shapes-deep", "llava-shapes-deep-variant")


def test_the_built_in_models_are_shipped():
    assert set(BUILTINS) <= set(builtin.available())
    for name in BUILTINS:
        report = json.loads((builtin.builtin_path(name) / "training_report.json").read_text())
        model = vlmjax.load(f"builtin:{name}", progress=False)
        assert report["config"]["seed"] == train.PRESETS[name].seed and report["parameters"] == sum(x.size for x in jax.tree.leaves(model.params))
        assert report["config"]["family"] == model.config.model_type


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """POPE questions on images neither model saw (another seed, hence another category prior too)."""
    root = tmp_path_factory.mktemp("heldout")
    generate_dataset(str(root), 150, 4321, image_size=64)
    return load_shapes_pope(root)


@pytest.mark.parametrize("name", BUILTINS)
def test_parity_with_hf_on_trained_weights(name, capsys):
    assert cli.main(["verify", f"builtin:{name}"]) == 0
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("name", BUILTINS)
def test_greedy_matches_hf_generate(name, heldout):
    path = builtin.builtin_path(name)
    processor = load_processor(path)
    processor.tokenizer.padding_side = "left"
    records = heldout[:: len(heldout) // 6][:6]
    texts = [DEFAULT_PROMPT.format(question=r.text).replace("<image>", image_placeholder(processor))
             for r in records]
    texts[1] += " no . USER: Describe the image . ASSISTANT:"  # a longer, multi-turn prompt
    inputs = dict(processor(images=[r.load_image() for r in records], text=texts, return_tensors="np",
                            padding=True))
    tokenizer = processor.tokenizer
    ref = load_hf_model(path).generate(**{k: torch.as_tensor(v) for k, v in inputs.items()}, max_new_tokens=12,
                                       do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id).numpy()
    ours = generate(vlmjax.load(f"builtin:{name}", progress=False), inputs, 12,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)


@pytest.fixture(scope="module")
def training_heldout():
    """The built-in models' own held-out split: the 21,414 POPE questions about the test images of their training
    seed's shapes world (same category prior, images never trained on)."""
    cfg = train.PRESETS["llava-shapes"]
    images, questions = train.shapes_questions(cfg.n_images, cfg.seed, cfg.image_size, cfg.test_fraction, ("pope",))
    return images, questions["test"]


# A seeded random sample of the held-out questions (they come in yes/no pairs, so a strided one can hold only "yes"
# questions: every 18th did). LLaVA's bar is 1.3 points below its full-split accuracy, so it gets 7,000 questions
# (standard error about 0.2 points); Qwen2-VL's is 4.5 below, 1,500; the deep LLaVA's 2 below, 3,000, and so its
# fine-tuned variant's (trained on seed 1's images, so this seed-0 split is held out for it too).
@pytest.mark.slow
@pytest.mark.parametrize("name, least_accuracy, n_questions", [("llava-shapes", 0.95, 7000),
                                                               ("qwen2-vl-shapes", 0.9, 1500),
                                                               ("llava-shapes-deep", 0.95, 3000),
                                                               ("llava-shapes-deep-variant", 0.95, 3000)])
def test_answers_held_out_questions_from_the_image(name, least_accuracy, n_questions, training_heldout):
    """Accurate with the images; chance (50 +- 5%) when every image is black, so the answers come from the image,
    not from a prior over the question's category."""
    images, questions = training_heldout
    chosen = np.sort(np.random.default_rng(0).choice(len(questions), n_questions, replace=False))
    questions = [questions[i] for i in chosen]
    assert abs(np.mean([q.answer == "yes" for q in questions]) - 0.5) < 0.03
    model = vlmjax.load(f"builtin:{name}", progress=False)
    processor = load_processor(model.path)
    result = train.evaluate_yes_no(model, processor, images, questions)
    black = train.evaluate_yes_no(model, processor, images, questions, black_images=True)
    assert {q.split for q in questions} == {"random", "popular", "adversarial"}
    assert result["accuracy"] >= least_accuracy
    assert abs(black["accuracy"] - 0.5) <= 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name, least_accuracy", [("llava-shapes", 0.95), ("qwen2-vl-shapes", 0.9)])
def test_main_job_answers_from_the_image(name, least_accuracy, tmp_path, capsys):
    """README's main job, `vlmjax eval` (for Qwen2-VL with --model) on the set it generates by default: accurate
    with the images, chance with black ones."""
    assert cli.main(["eval", "--model", f"builtin:{name}", "--out", str(tmp_path)]) == 0
    assert cli.main(["eval", "--model", f"builtin:{name}", "--data", str(tmp_path / "data"), "--out", str(tmp_path),
                     "--null-image", "black"]) == 0
    assert "adversarial" in capsys.readouterr().out
    real, black = ([json.loads(line) for line in (tmp_path / f"results{kind}.jsonl").read_text().splitlines()]
                   for kind in ("", "-black"))
    assert len(real) == len(black) == len(load_shapes_pope(tmp_path / "data"))
    real, black = score_pope(real)["overall"], score_pope(black)["overall"]
    assert real["accuracy"] >= least_accuracy
    assert abs(black["accuracy"] - 0.5) <= 0.05
