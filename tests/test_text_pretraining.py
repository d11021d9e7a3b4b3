"""The contrastive text stage of ``hybrid-sd train-shapes``: its hard negatives are the caption with one fact
changed, its loss teaches the encoder to prefer the true caption over them, and a run with it records the
stage and trains the large UNet on the encoder it left."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from hybrid_sd.cli import main
from hybrid_sd.shapes.dataset import Scene, Shape, caption
from hybrid_sd.shapes_pair import pair_models
from hybrid_sd.shapes_pair.model_card import _training_lines
from hybrid_sd.shapes_pair.text_pretraining import ContrastiveModel, colours_swapped, negatives, relation_swapped
from hybrid_sd.shapes_pair.training_data import caption_ids, dataset_scenes, render_scenes, to_unit

RED_CIRCLE = Shape("circle", "red", "large", (20, 12), 13)
BLUE_SQUARE = Shape("square", "blue", "small", (20, 50), 7)


def test_hard_negatives_change_the_relation_or_whose_colour_is_whose():
    two = Scene((RED_CIRCLE, BLUE_SQUARE), "above", 64)
    assert caption(two) == "a large red circle above a small blue square"
    assert relation_swapped(two) == "a large red circle below a small blue square"
    assert colours_swapped(two) == "a large blue circle above a small red square"
    one = Scene((RED_CIRCLE,), None, 64)
    assert relation_swapped(one) is None and colours_swapped(one) is None
    same_colour = Scene((RED_CIRCLE, Shape("square", "red", "small", (20, 50), 7)), "above", 64)
    assert colours_swapped(same_colour) is None
    assert negatives([two, one, same_colour]) == [
        relation_swapped(two),
        colours_swapped(two),
        relation_swapped(same_colour),
    ]


def test_the_contrastive_loss_teaches_the_encoder_the_true_caption_over_its_twins():
    """A few steps on one batch: the loss falls, and every image comes to score its own caption above each of
    its hard negatives (which, as captions of the same words, a bag-of-words reading cannot tell apart)."""
    tokenizer = pair_models.build_tokenizer()
    torch.manual_seed(0)
    model = ContrastiveModel(pair_models.build_text_encoder("clip", len(tokenizer)))
    scenes = [scene for scene in dataset_scenes(64, seed=3) if relation_swapped(scene)][:16]
    images = to_unit(render_scenes(scenes))
    ids = caption_ids(tokenizer, [caption(scene) for scene in scenes])
    swapped = {
        kind: caption_ids(tokenizer, [swap(scene) for scene in scenes])
        for kind, swap in (("relation", relation_swapped), ("colour", colours_swapped))
        if all(swap(scene) for scene in scenes)
    }
    negative_ids = caption_ids(tokenizer, negatives(scenes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = model.loss(images, ids, negative_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        image_embeddings = model.embed_images(images)
        true_scores = (image_embeddings * model.embed_texts(ids)).sum(-1)
        for kind, twin_ids in swapped.items():
            assert (true_scores > (image_embeddings * model.embed_texts(twin_ids)).sum(-1)).all(), kind


def test_train_shapes_pretrains_the_encoder_that_the_frozen_large_unet_then_trains_on(tmp_path):
    out = tmp_path / "trained"
    flags = ["--images", "64", "--batch-size", "8", "--vae-crop-steps", "1", "--vae-full-steps", "1"]
    flags += ["--large-steps", "1", "--warmup-steps", "1", "--text-steps", "2", "--freeze-text-encoder"]
    assert main(["train-shapes", "--cloud-only", "--out", str(out), *flags]) == 0
    record = json.loads((out / "training.json").read_text())
    text = record["stages"]["text"]
    assert (text["steps"], text["batch_size"], text["samples"]) == (2, 64, 128)  # the whole 64 images a step
    assert set(text["heldout_accuracy"]) == {"relation", "colour"}
    assert all(0 <= share <= 1 for share in text["heldout_accuracy"].values())
    tokenizer = pair_models.build_tokenizer()
    torch.manual_seed(record["config"]["seed"] + 1)  # as train() seeds the encoder
    initial = pair_models.build_text_encoder("clip", len(tokenizer)).to(torch.float16).state_dict()
    trained = load_file(out / "cloud" / "text_encoder" / "model.safetensors")
    assert not all(torch.equal(trained[name], initial[name]) for name in trained)
    rows = [line for line in _training_lines(record) if line.startswith(("| text", "| large"))]
    assert "2 x 64 (128)" in rows[0] and "relation" in rows[0]
    assert "as the text stage left it (frozen)" in rows[1]


def test_contrastive_pretraining_is_refused_for_an_encoder_without_a_pooled_output(tmp_path, capsys):
    command = ["train-shapes", "--cloud-only", "--out", str(tmp_path / "pair"), "--text-encoder", "t5"]
    assert main([*command, "--text-steps", "10"]) == 2
    assert "--text-steps" in capsys.readouterr().err
