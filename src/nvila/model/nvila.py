"""NVILA: vision tower -> (S2 merge) -> projector -> (TSP) -> fused into the LLM's input embeddings.

Tensors in, tensors out: no file I/O, no tokenizer, no device moves beyond following the weights.
The per-item plans made by the processor say what each media item must become; every block produced
here is checked against them, so a geometry bug fails loudly instead of shifting tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nvila.base.errors import PromptError
from nvila.formats.config import NvilaConfig
from nvila.formats.plans import MediaItem, TilePlan
from nvila.model.projector import Projector
from nvila.model.s2 import merge_scales, raster_tokens
from nvila.model.temporal import tsp_pool
from nvila.model.vision import VisionTower


class NvilaModel(nn.Module):
    """The three parts of an NVILA checkpoint plus the glue between them.

    Args:
        cfg: parsed NVILA configuration.
        vision: the vision tower wrapper.
        projector: the STC projector.
        llm: a transformers causal LM (Qwen2, Llama, ...), used through ``inputs_embeds``.
        media_token_ids: ``{"image": id, "video": id}`` placeholder ids in the prompt.
        end_token_ids: ids whose embeddings follow every image/tile/frame (the tokenised ``"\\n"``).
    """

    def __init__(
        self,
        cfg: NvilaConfig,
        vision: VisionTower,
        projector: Projector,
        llm: nn.Module,
        media_token_ids: dict[str, int],
        end_token_ids: Sequence[int],
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.media_token_ids = dict(media_token_ids)
        self.register_buffer("end_token_ids", torch.tensor(list(end_token_ids), dtype=torch.long), persistent=False)
        self.vision_batch_size = 32  # tiles per ViT call: bounds activation memory for long videos

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    # ---- vision -------------------------------------------------------------------------------
    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, G*G, C) ViT tokens, in chunks of ``vision_batch_size`` tiles."""
        device = next(self.vision.parameters()).device
        # A frozen ViT needs no autograd graph even while the rest trains: its activations are not kept.
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(grad):
            out = [self.vision(chunk.to(device)) for chunk in pixels.split(self.vision_batch_size)]
        return torch.cat(out)

    def encode_media(self, media: Sequence[MediaItem]) -> list[torch.Tensor]:
        """ViT tokens of every item of ``media``: one (N_i, G_i*G_i, C) tensor each. Consecutive items with
        tiles of one size go through the tower together (video frames may be smaller than image tiles)."""
        out: list[torch.Tensor] = []
        i = 0
        while i < len(media):
            j = i + 1
            while j < len(media) and media[j].pixels.shape[1:] == media[i].pixels.shape[1:]:
                j += 1
            feats = self.encode_tiles(torch.cat([m.pixels for m in media[i:j]]))
            out += list(feats.split([m.pixels.shape[0] for m in media[i:j]]))
            i = j
        return out

    def project(self, feats: torch.Tensor, repeat_channels: int = 1) -> torch.Tensor:
        """(N, G*G, C) -> (N, g*g, D); single tiles of S2 models repeat their channels per scale."""
        if repeat_channels > 1:
            feats = feats.repeat(1, 1, repeat_channels)                  # [f, f, f] on channels
        param = next(self.projector.parameters())
        return self.projector(feats.to(device=param.device, dtype=param.dtype))

    def end_embeds(self) -> torch.Tensor:
        """(E, D) embeddings appended after every image, tile or frame."""
        return self.llm.get_input_embeddings()(self.end_token_ids)

    def embed_media(self, media: Sequence[MediaItem],
                    feats: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Embedding block of every placeholder of ``media``, in prompt order: list of (n_i, D): each row of
        visual tokens (:meth:`media_rows`) followed by the end embeddings.

        ``feats`` are the ViT tokens of every item (:meth:`encode_media`) when already computed (benchmarks
        time the vision tower separately; training may reuse the tokens of a frozen tower).
        """
        end = self.end_embeds()
        return [torch.cat([torch.cat([r.to(end.device), end.to(r.dtype)]) for r in rows])
                for rows in self.media_rows(media, feats)]

    def media_rows(self, media: Sequence[MediaItem],
                   feats: Sequence[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
        """Visual tokens of every placeholder of ``media``, without the end embeddings: for each placeholder a
        list of (n, D) rows (a tile, a frame or a pooled frame group; a Dynamic-S2 image is one row)."""
        if not media:
            return []
        if feats is None:
            feats = self.encode_media(media)
        if len(feats) != len(media):
            raise ValueError(f"{len(feats)} feature tensors for {len(media)} media items")
        return [rows for item, f in zip(media, feats) for rows in self._item_rows(item, f)]

    def _item_rows(self, item: MediaItem, feats: torch.Tensor) -> list[list[torch.Tensor]]:
        plan = item.plan
        if not isinstance(plan, TilePlan):                               # video
            frames = self.project(feats, plan.frame_plan.repeat_channels)  # (T, n, D)
            enc = self.cfg.video_encoder
            pooled = [frames] if enc.kind == "basic" else [tsp_pool(frames, pool) for pool in enc.pool_sizes]
            rows = [[r for p in pooled for r in p]]
            expected = [plan.num_embeddings]
        elif plan.kind == "dynamic_s2":
            rows_, cols = plan.block
            k = [s // self.cfg.tile_size for s in self.cfg.s2_scales[:-1]]
            chunks = self.project(merge_scales(feats, k, plan.block))   # (rows*cols, g*g, D)
            rows = [[raster_tokens(chunks, rows_, cols)]]
            expected = [plan.embeds_per_placeholder]
        else:                                                            # one block per tile
            tokens = self.project(feats, plan.repeat_channels)           # (N, g*g, D)
            rows = [[t] for t in tokens]
            expected = [plan.embeds_per_placeholder] * plan.placeholders
        end = len(self.end_token_ids)
        got = [sum(r.shape[0] + end for r in block) for block in rows]
        if got != expected:
            raise PromptError(
                f"{item.kind} produced embedding blocks of sizes {got} but its plan expects {expected}; "
                "the checkpoint's vision/projector geometry does not match its config (tile size, patch size, "
                "projector type)"
            )
        return rows

    # ---- fusion -------------------------------------------------------------------------------
    def fuse(self, input_ids: Sequence[int], blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Replace each placeholder id by the next media block: (L_text,) ids -> (L_fused, D)."""
        ids = torch.tensor(list(input_ids), dtype=torch.long, device=self.device)
        text = self.llm.get_input_embeddings()(ids)                      # (L_text, D)
        placeholder = torch.zeros_like(ids, dtype=torch.bool)
        for tid in self.media_token_ids.values():
            placeholder |= ids == tid
        positions = placeholder.nonzero().flatten().tolist()
        if len(positions) != len(blocks):
            raise PromptError(
                f"the prompt has {len(positions)} media placeholders but {len(blocks)} media embedding blocks "
                "were produced; every image/video part must match one placeholder"
            )
        pieces, prev = [], 0
        for pos, block in zip(positions, blocks):
            pieces += [text[prev:pos], block.to(text.dtype)]
            prev = pos + 1
        pieces.append(text[prev:])
        return torch.cat(pieces)

    def embed_prompt(self, input_ids: Sequence[int], media: Sequence[MediaItem]) -> torch.Tensor:
        """Token ids + media -> (L_fused, D) input embeddings for the LLM."""
        return self.fuse(input_ids, self.embed_media(media))
