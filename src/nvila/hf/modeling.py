"""NVILA as a transformers model: ``PreTrainedModel`` + ``GenerationMixin`` over nvila's own modules.

The parts are registered under the "-hf" names (``llm``, ``vision_tower``, ``mm_projector``), so the state dict
is the "-hf" layout's. ``from_pretrained`` loads either layout through :func:`nvila.checkpoint.load.load_checkpoint`
(the same loader as ``nvila.load``), so the weights, dtypes and the embedding rows of the media tokens are
exactly nvila's. Inputs are the processor's (:mod:`nvila.hf_remote.processing_nvila`): ``input_ids`` hold one
media token id per visual token and the end ids as text, so the forward pass only scatters visual tokens.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel

from nvila.base.errors import CheckpointError, PromptError
from nvila.checkpoint.load import Checkpoint, load_checkpoint
from nvila.formats.hf import GENERATION_CONFIG
from nvila.formats.plans import MediaItem
from nvila.hf_remote.configuration_nvila import NVILAConfig, NVILALiteConfig
from nvila.model.nvila import NvilaModel
from nvila.processing.tiling import plan_image, plan_video, s2_plan


class NVILAForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """NVILA (Dynamic-S2) for ``AutoModelForImageTextToText``; build it with :meth:`from_pretrained`."""

    config_class = NVILAConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["Qwen2DecoderLayer", "LlamaDecoderLayer", "SiglipEncoderLayer"]

    def __init__(self, config: NVILAConfig, nvila_model: NvilaModel | None = None) -> None:
        super().__init__(config)
        if nvila_model is None:
            raise CheckpointError(f"{type(self).__name__} is built by from_pretrained(folder) from a checkpoint "
                                  "(llava or '-hf' layout); there is no random initialisation from a config")
        self.llm = nvila_model.llm
        self.vision_tower = nvila_model.vision.model
        self.mm_projector = nvila_model.projector
        object.__setattr__(self, "nvila", nvila_model)   # shares the parts; not a second set of parameters

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        dtype: Any = None, torch_dtype: Any = None, device_map: Any = None, **kwargs: Any
                        ) -> "NVILAForConditionalGeneration":
        """Load a checkpoint folder or Hub id in either layout. ``dtype`` (or ``torch_dtype``): float32 by
        default (the reference's numbers), or "auto" / any torch dtype; ``device_map``: one device."""
        if isinstance(device_map, dict):
            raise CheckpointError("NVILA loads on one device: pass device_map='cpu' or 'cuda:N', not a map")
        want = dtype if dtype is not None else torch_dtype
        if want == "auto":
            want = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        want = getattr(torch, want) if isinstance(want, str) else (want or torch.float32)
        ckpt = load_checkpoint(pretrained_model_name_or_path, dtype=want, device=str(device_map or "cpu"))
        return cls.from_checkpoint(ckpt)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> "NVILAForConditionalGeneration":
        """Wrap a loaded checkpoint (shares its modules)."""
        model = ckpt.model
        cfg_cls = NVILALiteConfig if model.cfg.downsample == 3 else NVILAConfig
        text, vision = model.llm.config, model.vision.model.config
        config = cfg_cls(text_config=text.to_dict(), vision_config=vision.to_dict(),
                         image_token_id=model.media_token_ids["image"], video_token_id=model.media_token_ids["video"])
        config.dtype = model.dtype
        klass = NVILALiteForConditionalGeneration if cfg_cls is NVILALiteConfig else NVILAForConditionalGeneration
        out = klass(config, model)
        gen = ckpt.root / GENERATION_CONFIG
        out.generation_config = (GenerationConfig.from_pretrained(ckpt.root) if gen.is_file()
                                 else GenerationConfig.from_model_config(text))
        out.generation_config.eos_token_id = ckpt.stop_token_ids
        return out.eval()

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, block_sizes: Sequence[Any] | None = None,
                video_num_frames: Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, pixel_values_videos, block_sizes, video_num_frames)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        labels=labels, **kwargs)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              pixel_values_videos: torch.Tensor | None, block_sizes: Sequence[Any] | None,
              video_num_frames: Sequence[int] | None) -> torch.Tensor:
        """(B, L) expanded ids + media -> (B, L, D) input embeddings: text embeddings with every media token
        position replaced by the next visual token of its kind (images and videos each in order)."""
        ids = self.nvila.media_token_ids
        emb = self.llm.get_input_embeddings()
        is_img, is_vid = input_ids == ids["image"], input_ids == ids["video"]
        out = emb(input_ids.masked_fill(is_img | is_vid, 0))
        for mask, items, kind in ((is_img, self._image_items(pixel_values, block_sizes), "image"),
                                  (is_vid, self._video_items(pixel_values_videos, video_num_frames), "video")):
            if not mask.any() and not items:
                continue
            rows = [r for block in self.nvila.media_rows(items) for r in block]
            tokens = torch.cat(rows) if rows else out.new_zeros(0, out.shape[-1])
            if tokens.shape[0] != int(mask.sum()):
                raise PromptError(f"input_ids hold {int(mask.sum())} {kind} token positions but the {kind} inputs "
                                  f"give {tokens.shape[0]} visual tokens; pass the processor's outputs unchanged")
            out = out.masked_scatter(mask[..., None].to(out.device), tokens.to(out.dtype))
        return out

    def _image_items(self, pixels: torch.Tensor | None, block_sizes: Sequence[Any] | None) -> list[MediaItem]:
        if pixels is None or len(pixels) == 0:
            return []
        cfg = self.nvila.cfg
        single = plan_image(cfg.tile_size, cfg.tile_size, cfg, single_image=False)
        if cfg.image_mode != "dynamic_s2":              # every tile is its own block
            return [MediaItem("image", t[None], single) for t in pixels]
        items, start = [], 0
        for block in block_sizes or [None] * len(pixels):
            plan = single if block is None else s2_plan(int(block[1]), int(block[0]), cfg)
            n = len(plan.tiles)
            items.append(MediaItem("image", pixels[start : start + n], plan))
            start += n
        if start != len(pixels):
            raise PromptError(f"block_sizes account for {start} image tiles but pixel_values has {len(pixels)}")
        return items

    def _video_items(self, pixels: torch.Tensor | None, num_frames: Sequence[int] | None) -> list[MediaItem]:
        if pixels is None or len(pixels) == 0:
            return []
        counts = [int(n) for n in (num_frames if num_frames is not None else [len(pixels)])]
        if sum(counts) != len(pixels):
            raise PromptError(f"video_num_frames {counts} do not add up to the {len(pixels)} video frames")
        items, start = [], 0
        for n in counts:
            items.append(MediaItem("video", pixels[start : start + n], plan_video(n, self.nvila.cfg)))
            start += n
        return items


class NVILALiteForConditionalGeneration(NVILAForConditionalGeneration):
    """NVILA-Lite (dynamic tiling, 3x3 projector)."""

    config_class = NVILALiteConfig
