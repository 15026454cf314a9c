"""Train a small VLM (LLaVA or Qwen2-VL architecture) on the shapes world, in JAX, and save it as an HF directory.

``python -m vlmjax.train --preset llava-shapes --out DIR`` generates a shapes-world dataset in memory
(``vlmjax.data.shapes``), builds a word-level tokenizer and the family's HF processor, initialises a small model of
an HF architecture with Flax (``nnx.Rngs``; LLaVA: CLIP tower, MLP projector, Llama decoder; or Qwen2-VL: its tower
with 2-D rotary and patch merger, Qwen2 decoder with M-RoPE), saves it as an HF directory, loads it with
``vlmjax.load`` and trains it with optax (AdamW, warmup then cosine decay) in two stages:

1. alignment: every visual token's output (after the projector / merger) is pulled, through the tied word
   embeddings, towards the colour and shape words of the object it shows (``grounding_loss``), training the vision
   tower and projector the way LLaVA's first stage trains its projector;
2. instruction tuning: multi-turn conversations per image (POPE yes/no questions, then "Describe the image." and the
   attribute / counting questions; and those open questions on their own, so they are first turns too), loss
   on the reply tokens (each yes/no reply weighted so that every category is as often "yes" as "no",
   ``answer_weights``), plus the grounding loss.

Prompts have the evaluation form ``USER: <image> Is there a red circle in the image? ASSISTANT: yes</s>``. The
trained parameters are written with ``converters.hf.save_hf``, so ``vlmjax.load(DIR)`` and HF ``from_pretrained(DIR)``
both read the result, and ``training_report.json`` beside them records the config, losses, held-out POPE accuracy and
the accuracy with black images. Everything is deterministic given the seed: images, questions, initialisation and
batch order. ``--init-from MODEL`` (preset field ``init_from``) continues a trained model instead (its architecture
and vocabulary must be the settings'), with ``--alignment-steps 0`` skipping the alignment stage: the
``llava-shapes-deep-variant`` preset fine-tunes the shipped organism further on another seed's data.

The package, along its seams: ``presets`` (settings, presets, processor, initial model), ``data`` (conversations,
reply weights, grounding targets, batch streams), ``losses``, ``loop`` (optimiser, checkpoints, the two stages),
``report`` (one whole run and its report) and ``command`` (the command line).
"""

from vlmjax.train.command import main
from vlmjax.train.data import (answer_weights, conversation_batches, conversation_text, conversations, describe_sample,
                               encode, image_batches, loss_weights, model_batch, patch_labels, reply_starts,
                               shapes_questions)
from vlmjax.train.losses import alignment_loss, grounding_loss, training_forward, training_loss
from vlmjax.train.loop import StageCheckpoints, fit, make_optimizer, train
from vlmjax.train.presets import (DESCRIBE_QUESTION, FAMILIES, PRESETS, PROMPT, TASKS, TrainConfig, build_processor,
                                  check_initial_model, hf_config, init_hf_model, initial_model, shapes_vocabulary,
                                  token_side)
from vlmjax.train.report import evaluate_first_token, evaluate_yes_no, parameter_count, run

__all__ = ["DESCRIBE_QUESTION", "FAMILIES", "PRESETS", "PROMPT", "StageCheckpoints", "TASKS", "TrainConfig",
           "alignment_loss", "answer_weights", "build_processor", "check_initial_model", "conversation_batches",
           "conversation_text", "conversations", "describe_sample", "encode", "evaluate_first_token",
           "evaluate_yes_no", "fit", "grounding_loss", "hf_config", "image_batches", "init_hf_model", "initial_model",
           "loss_weights", "main", "make_optimizer", "model_batch", "parameter_count", "patch_labels", "reply_starts",
           "run", "shapes_questions", "shapes_vocabulary", "token_side", "train", "training_forward", "training_loss"]
