"""LoRA settings: the hyper-parameters of an adapter, as recipes give them and adapter folders record them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from nvila.base.errors import ConfigError

LLM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (defaults: the NVILA reference's r=64, alpha=16, dropout=0.05).

    ``target_modules`` are module-name suffixes inside the LLM (default: attention and MLP projections).
    """

    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LLM_PROJECTIONS

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"lora r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be a number in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
            raise ConfigError(f"lora target_modules must be a list of module names, got {targets!r}")
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"lora target_modules must be a non-empty list of module names, got {list(targets)!r}")
        object.__setattr__(self, "target_modules", tuple(targets))   # lists (from YAML/JSON) become tuples

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraSettings":
        """Settings from a recipe / nvila_adapter.json mapping; unknown keys are an error."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown lora settings {unknown}; known: {known}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    def peft_config(self, base: str | None = None) -> Any:
        """The equivalent ``peft.LoraConfig`` (bias untouched, causal-LM task)."""
        peft = require_peft()
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
                               base_model_name_or_path=base)


def require_peft() -> Any:
    """The peft module, or a ConfigError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA adapters need the peft package: pip install 'nvila[train]'") from None
    return peft
