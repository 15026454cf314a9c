"""The training script of the built-in models: both families train (losses fall), save HF directories that load,
continue a saved model (from its weights, resuming exactly), and Qwen2-VL's per-image training forward equals the
model's packed forward."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import vlmjax
from vlmjax import train
from vlmjax.errors import VlmJaxError


def _small(family: str) -> train.TrainConfig:
    base = train.PRESETS["qwen2-vl-shapes" if family == "qwen2_vl" else "llava-shapes"]
    return dataclasses.replace(base, n_images=48, test_fraction=0.25, vision_hidden=32, vision_layers=1,
                               text_hidden=32, text_layers=2, batch_size=8, alignment_steps=30, steps=30,
                               learning_rate=3e-3, alignment_learning_rate=3e-3)


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def prepared(request, tmp_path_factory):
    cfg = _small(request.param)
    images, questions = train.shapes_questions(cfg.n_images, cfg.seed, cfg.image_size, cfg.test_fraction, cfg.tasks)
    processor = train.build_processor(cfg)
    path = tmp_path_factory.mktemp(request.param)
    train.init_hf_model(cfg, processor, path)
    model = vlmjax.load(path, progress=False)
    weights = train.answer_weights(questions["train"]) if cfg.balance_answers else None
    data = train.encode(processor, images, train.conversations(questions["train"], cfg.seed), train.token_side(cfg),
                        cfg.label_objects, cfg.label_min_fraction, weights)
    return cfg, model, data


def test_losses_fall(prepared):
    cfg, model, data = prepared
    _, history, _ = train.train(model, data, cfg, progress=False)
    aligned, tuned = history["alignment"]["grounding"], history["training"]["answer"]
    assert len(aligned) == cfg.alignment_steps and len(tuned) == cfg.steps
    assert np.mean(aligned[-5:]) < 0.8 * np.mean(aligned[:5])
    assert np.mean(tuned[-5:]) < 0.8 * np.mean(tuned[:5])


def test_batches_carry_reply_masks_and_one_label_row_per_visual_token(prepared):
    cfg, model, data = prepared
    batch = next(train.conversation_batches(model, data, 4, 1, cfg.seed))
    n_tokens = (cfg.image_size // train.token_side(cfg)) ** 2
    assert batch["patch_labels"].shape == (4, n_tokens, cfg.label_objects, 2)
    weights = batch["patch_weights"]
    assert weights.shape == (4, n_tokens, cfg.label_objects) and (weights > 0).any()
    np.testing.assert_allclose(weights.sum(-1)[weights.sum(-1) > 0], 1, rtol=1e-6)
    assert ((batch["patch_labels"][..., 0] >= 0) == (weights > 0)).all()
    assert (batch["input_ids"] == model.config.image_token_id).sum(axis=1).tolist() == [n_tokens] * 4
    replies = batch["input_ids"][batch["loss_weights"] > 0]
    eos = model.hf_config.text_config.eos_token_id
    assert (replies == eos).sum() == (batch["input_ids"] == eos).sum()  # every reply ends with a learned </s>
    assert model.config.image_token_id not in replies.tolist()


@pytest.mark.parametrize("prepared", ["qwen2_vl"], indirect=True)
def test_qwen2_vl_training_forward_equals_the_packed_forward(prepared):
    """(LLaVA's training forward is model.forward itself.)"""
    cfg, model, data = prepared
    batch = next(train.conversation_batches(model, data, 4, 1, cfg.seed))
    ours = train.training_forward(model, model.params, batch, logits="all")
    packed = model.forward(model.params, train.model_batch(batch), logits="all")
    np.testing.assert_allclose(np.asarray(ours["logits"]), np.asarray(packed["logits"]), atol=1e-5)


@pytest.mark.parametrize("prepared", ["llava"], indirect=True)
def test_a_stopped_run_resumes_from_its_checkpoint_exactly(prepared, tmp_path):
    """Train 30 + 30 steps with checkpoints every 4 steps, stop at training step 26 (the newest checkpoint is step
    24's), start again: the resumed run's parameters and loss history equal an uninterrupted run's."""
    cfg, model, data = prepared
    cfg = dataclasses.replace(cfg, checkpoint_every=4)
    whole, whole_history, _ = train.train(model, data, cfg, progress=False)

    class Stop(Exception):
        pass

    stopping = train.StageCheckpoints.save

    def save_then_stop(self, step, *args, **kwargs):
        stopping(self, step, *args, **kwargs)
        if self.directory.name == "training" and step == 26:
            self.manager.wait_until_finished()  # as if the process died after the saves it had begun
            raise Stop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.StageCheckpoints, "save", save_then_stop)
        with pytest.raises(Stop):
            train.train(model, data, cfg, progress=False, checkpoint_dir=tmp_path)
    assert train.StageCheckpoints(tmp_path / "training", 4, dataclasses.asdict(cfg)).manager.latest_step() == 24
    resumed, resumed_history, seconds = train.train(model, data, cfg, progress=False, checkpoint_dir=tmp_path)
    assert resumed_history == whole_history and seconds > 0
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(VlmJaxError, match="steps=30 there, 31 now"):
        train.train(model, data, dataclasses.replace(cfg, steps=31), progress=False, checkpoint_dir=tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A whole run (2 + 2 steps) of the small LLaVA: (its output directory, its report)."""
    path = tmp_path_factory.mktemp("trained")
    return path, train.run(dataclasses.replace(_small("llava"), alignment_steps=2, steps=2), path, progress=False)


def test_run_saves_an_hf_directory_with_a_report(trained):
    path, report = trained
    saved = json.loads((path / "training_report.json").read_text())
    assert saved["test_accuracy"] == report["test_accuracy"] and set(saved["test_accuracy_by_split"]) == {
        "random", "popular", "adversarial"}
    from vlmjax import load_processor

    assert vlmjax.load(path, progress=False).config.image_token_id == load_processor(path).image_token_id


def _continued(source) -> train.TrainConfig:
    """Training continued from `source` (the small LLaVA's architecture) on another seed, without alignment."""
    return dataclasses.replace(_small("llava"), init_from=str(source), seed=1, alignment_steps=0, steps=8,
                               learning_rate=1e-3, checkpoint_every=4)


def test_training_from_a_saved_model_starts_from_its_weights(trained, tmp_path):
    source = trained[0]
    cfg = _continued(source)
    model = train.initial_model(cfg, train.build_processor(cfg), tmp_path)
    for a, b in zip(jax.tree.leaves(vlmjax.load(source, progress=False).params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not list(tmp_path.iterdir())  # nothing was initialised
    with pytest.raises(VlmJaxError, match="text.num_layers: 2 there, 3 in the settings"):
        train.initial_model(dataclasses.replace(cfg, text_layers=3), train.build_processor(cfg), tmp_path)
    with pytest.raises(VlmJaxError, match="vocabulary"):
        wider = dataclasses.replace(cfg, image_size=72)  # more number words (and another tower)
        train.initial_model(wider, train.build_processor(wider), tmp_path)


def test_a_continued_run_resumes_exactly_and_refuses_other_starting_weights(trained, tmp_path):
    """Continue the trained model for 8 steps whole, and in a piece stopped at step 6 (newest checkpoint: step 4)
    from a copy of it; the piece refuses to resume once the copy's weights change, and resumes exactly with them
    restored: the same parameters as the whole run, which moved away from the source's."""
    import shutil

    source = trained[0]
    whole = train.run(_continued(source), tmp_path / "whole", progress=False)
    shutil.copytree(source, tmp_path / "start")
    cfg = _continued(tmp_path / "start")

    class Stop(Exception):
        pass

    stopping = train.StageCheckpoints.save

    def save_then_stop(self, step, *args, **kwargs):
        stopping(self, step, *args, **kwargs)
        if step == 6:
            self.manager.wait_until_finished()
            raise Stop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.StageCheckpoints, "save", save_then_stop)
        with pytest.raises(Stop):
            train.run(cfg, tmp_path / "piece", progress=False)
    assert sorted(p.name for p in (tmp_path / "piece" / "checkpoints").iterdir()) == ["training"]  # no alignment
    weights = tmp_path / "start" / "model.safetensors"
    original = weights.read_bytes()
    shutil.copy(tmp_path / "whole" / "model.safetensors", weights)
    with pytest.raises(VlmJaxError, match="init_from_weights"):
        train.run(cfg, tmp_path / "piece", progress=False)
    weights.write_bytes(original)
    resumed = train.run(cfg, tmp_path / "piece", progress=False)
    assert resumed["alignment_loss_last_50"] is None and resumed["config"]["init_from"] == str(tmp_path / "start")
    assert (resumed["answer_loss_first_50"], resumed["answer_loss_last_50"]) == (whole["answer_loss_first_50"],
                                                                                 whole["answer_loss_last_50"])
    params = [jax.tree.leaves(vlmjax.load(path, progress=False).params) for path in
              (tmp_path / "whole", tmp_path / "piece", source)]
    for a, b in zip(params[0], params[1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(params[0], params[2]))


def test_command_line_overrides_the_preset(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train.command, "run", lambda cfg, out: seen.update(cfg=cfg, out=out) or {})
    train.main(["--preset", "qwen2-vl-shapes", "--out", str(tmp_path), "--steps", "7", "--tasks", "pope"])
    assert seen["cfg"] == dataclasses.replace(train.PRESETS["qwen2-vl-shapes"], steps=7, tasks=("pope",))
    train.main(["--preset", "qwen2-vl-shapes", "--out", str(tmp_path), "--balance-answers"])
    assert seen["cfg"].balance_answers and not train.PRESETS["qwen2-vl-shapes"].balance_answers
    train.main(["--out", str(tmp_path), "--no-balance-answers"])
    assert not seen["cfg"].balance_answers and train.PRESETS["llava-shapes"].balance_answers
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--tasks", "pope,dance"])
    train.main(["--out", str(tmp_path), "--init-from", "builtin:llava-shapes", "--vision-heads", "2"])
    assert (seen["cfg"].init_from, seen["cfg"].vision_heads) == ("builtin:llava-shapes", 2)
    train.main(["--preset", "llava-shapes-deep-variant", "--out", str(tmp_path)])
    assert seen["cfg"].init_from == "builtin:llava-shapes-deep" and seen["cfg"].alignment_steps == 0
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--steps", "0"])


def test_patch_labels_give_each_object_its_pixel_share():
    from PIL import Image

    from vlmjax.data.shapes import COLOURS, ShapeObject

    pixels = np.full((16, 16, 3), 200, np.uint8)
    pixels[0:4, 0:12] = COLOURS["red"]  # 48 pixels
    pixels[8:16, 0:2] = COLOURS["blue"]  # 16 pixels
    objects = (ShapeObject("square", "red", "small", (0, 0, 12, 4)), ShapeObject("cross", "blue", "small", (0, 8, 2, 16)))
    tokenizer = train.build_processor(train.PRESETS["llava-shapes"]).tokenizer
    ids = lambda *words: tokenizer.convert_tokens_to_ids(list(words))
    labels, weights = train.patch_labels(Image.fromarray(pixels), objects, 16, tokenizer, max_objects=3,
                                         min_fraction=0.05)
    assert labels[0].tolist() == [ids("red", "square"), ids("blue", "cross"), [-1, -1]]
    np.testing.assert_allclose(weights[0], [0.75, 0.25, 0])
    labels, weights = train.patch_labels(Image.fromarray(pixels), objects, 16, tokenizer)  # majority, >= 1/8
    assert labels[0].tolist() == [ids("red", "square")] and weights[0].tolist() == [1]
    labels, weights = train.patch_labels(Image.fromarray(pixels), objects, 8, tokenizer)
    assert labels[:, 0, 0].tolist() == [*ids("red", "red", "blue"), -1] and weights[:, 0].tolist() == [1, 1, 1, 0]


def test_answer_weights_make_every_category_as_often_yes_as_no(prepared):
    cfg, model, data = prepared
    _, questions = train.shapes_questions(cfg.n_images, cfg.seed, cfg.image_size, cfg.test_fraction, cfg.tasks)
    pope = [q for q in questions["train"] if q.question_type == "pope"]
    weights = train.answer_weights(pope)
    mass: dict = {}
    for q in pope:
        key = (q.target["colour"], q.target["shape"])
        mass.setdefault(key, {"yes": 0.0, "no": 0.0})[q.answer] += weights[(*key, q.answer)]
    unbalanced = [m for m in mass.values() if m["yes"] and m["no"]]
    assert unbalanced and all(abs(m["yes"] - m["no"]) < 1e-9 for m in unbalanced)
    assert np.mean([weights[(q.target["colour"], q.target["shape"], q.answer)] for q in pope]) == pytest.approx(1)
    assert len(set(weights.values())) > 2  # the generated questions are not balanced by category


def test_loss_weights_put_each_pope_weight_on_its_yes_no_token(prepared):
    cfg, model, data = prepared
    tokenizer = train.build_processor(cfg).tokenizer
    if not cfg.balance_answers:
        assert set(np.unique(data["loss_weights"])) <= {0.0, 1.0}
        return
    yes_no = np.isin(data["input_ids"], tokenizer.convert_tokens_to_ids(["yes", "no"]))
    weighted = (data["loss_weights"] != 0) & (data["loss_weights"] != 1)
    assert weighted.any() and not (weighted & ~yes_no).any()
    starts = train.reply_starts(data["input_ids"], tokenizer)
    assert not (yes_no & (data["loss_weights"] > 0) & ~starts).any()  # yes/no replies are one token


def test_open_questions_are_also_first_turns_and_yes_no_answers_come_first():
    """Every attribute / count question opens a conversation of its own once (evaluation asks it as the first turn),
    and in the POPE conversations no open answer precedes a yes/no question (it could give the answer away)."""
    cfg = train.PRESETS["llava-shapes-deep"]
    _, questions = train.shapes_questions(40, cfg.seed, cfg.image_size, 0.25, cfg.tasks)
    dialogues = train.conversations(questions["train"], cfg.seed)
    opened = [d for d in dialogues if d[0].question_type in ("attribute", "count")]
    open_ids = sorted(q.question_id for q in questions["train"] if q.question_type in ("attribute", "count"))
    assert open_ids and sorted(q.question_id for d in opened for q in d) == open_ids
    assert all(q.question_type in ("attribute", "count") for d in opened for q in d)
    for d in dialogues:
        kinds = [q.question_type for q in d]
        assert "pope" not in kinds or kinds[: kinds.count("pope")] == ["pope"] * kinds.count("pope")
