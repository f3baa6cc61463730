"""Vision tower: a transformers vision model returning the selected hidden layer's tokens.

NVILA takes ``hidden_states[select_layer]`` (-2: the output of the second-to-last encoder layer, before
the post-LayerNorm). Layers after the selected one never run: their weights stay in the module (so a
checkpoint round-trips unchanged) but the forward loop stops early, which saves one ViT layer per tile.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from nvila.base.errors import ConfigError


class VisionTower(nn.Module):
    """Wraps ``SiglipVisionModel`` or ``Dinov2Model`` (any model with ``embeddings`` + ``encoder.layers``/``layer``)."""

    def __init__(self, model: nn.Module, select_layer: int = -2, select_feature: str = "cls_patch") -> None:
        super().__init__()
        self.model = model
        num_layers = len(encoder_layers(model))
        # hidden_states has num_layers + 1 entries (embeddings first); index -> layers to run.
        index = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
        if not 0 <= index <= num_layers:
            raise ConfigError(
                f"mm_vision_select_layer={select_layer} is out of range for a vision tower with {num_layers} layers"
            )
        self.layers_to_run = index
        self.drop_first_token = select_feature == "patch"
        self.image_size = getattr(model.config, "image_size", None)
        # SigLIP keeps its position table at the trained size unless asked to interpolate; DINOv2 always does.
        self._interpolates = "interpolate_pos_encoding" in inspect.signature(model.embeddings.forward).parameters

    @property
    def layers(self) -> nn.ModuleList:
        return encoder_layers(self.model)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def idle_parameters(self) -> list[nn.Parameter]:
        """Parameters that never take part in the forward: layers after the selected one, post-LayerNorm,
        pooling head. Training must leave them frozen (distributed data parallel requires it)."""
        used = {id(p) for m in (self.model.embeddings, *self.layers[: self.layers_to_run])
                for p in m.parameters()}
        return [p for p in self.model.parameters() if id(p) not in used]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) pixels -> (N, L, C) tokens of the selected layer."""
        # SigLIP's patch embeddings come out as a transposed view, and every residual add would keep that
        # layout: LayerNorms would then copy their input and the adds run strided (a few % of the tower).
        other_size = self.image_size is not None and pixels.shape[-1] != self.image_size   # video_frame_size
        kwargs = {"interpolate_pos_encoding": True} if other_size and self._interpolates else {}
        x = self.model.embeddings(pixels.to(self.dtype), **kwargs).contiguous()   # (N, L, C)
        for layer in self.layers[: self.layers_to_run]:
            x = layer(x, None)
        return x[:, 1:] if self.drop_first_token else x


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a vision model (SigLIP names them ``encoder.layers``, DINOv2 ``encoder.layer``)."""
    encoder = model.encoder
    layers = getattr(encoder, "layers", None)
    return layers if layers is not None else encoder.layer
