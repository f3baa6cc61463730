"""Training loss on fused media+text sequences, against a direct computation."""

from __future__ import annotations

import math

import torch
from conftest import CHECKPOINTS, MEDIA

import nvila
from nvila.formats.plans import IGNORE_INDEX
from nvila.train.loss import answer_loss
from nvila.train.step import collate


def _conversations() -> list[list[dict]]:
    image = {"type": "image", "image": str(MEDIA / "hopper_64x64.png")}
    return [
        [{"role": "user", "content": [image, {"type": "text", "text": "What is shown?"}]},
         {"role": "assistant", "content": "A face in grey."}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red, of course."}],
    ]


def test_loss_matches_per_sequence_log_probs() -> None:
    pipe = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32", device="cpu")
    prompts = [pipe.processor(c, training=True) for c in _conversations()]
    batch = collate(pipe.model, prompts)
    loss, n = answer_loss(pipe.model, batch)
    # independent computation: each conversation alone, unpadded, summing -log p of supervised tokens
    total, count = 0.0, 0
    for prompt in prompts:
        with torch.no_grad():
            x = pipe.model.embed_prompt(prompt.input_ids, prompt.media)
            logp = pipe.model.llm(inputs_embeds=x[None]).logits[0].log_softmax(-1)
        fused_text_ids = []  # supervised ids in the fused sequence are the text ids after the media blocks
        offset = 0
        for token, label in zip(prompt.input_ids, prompt.labels):
            if token in pipe.model.media_token_ids.values():
                offset += prompt.media[0].num_embeddings   # one placeholder -> the whole block
                continue
            fused_text_ids.append((offset, label))
            offset += 1
        positions = [(i, lab) for i, (_, lab) in enumerate(fused_text_ids) if lab != IGNORE_INDEX]
        for i, lab in positions:
            pos = fused_text_ids[i][0]
            total -= float(logp[pos - 1, lab])
            count += 1
    assert n == count == sum(sum(1 for t in p.labels if t != IGNORE_INDEX) for p in prompts)
    assert math.isclose(loss.item(), total, rel_tol=1e-5)


def test_gradients_reach_projector_and_vision() -> None:
    pipe = nvila.load(CHECKPOINTS / "nvila", dtype="float32", device="cpu")
    model = pipe.model.train()
    prompts = [pipe.processor(_conversations()[0], training=True)]
    loss, _ = answer_loss(model, collate(model, prompts))
    loss.backward()
    assert model.projector.layers[2].weight.grad.abs().sum() > 0
    assert model.vision.model.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    # the unused last ViT layer gets no gradient: it never runs
    assert model.vision.model.encoder.layers[-1].mlp.fc1.weight.grad is None
