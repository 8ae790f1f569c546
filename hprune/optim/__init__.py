"""Optimizers: SensitivityAdamW (per-parameter update scales for Sensitivity-Guided Distillation)."""
from hprune.optim.sensitivity_adamw import SensitivityAdamW

__all__ = ["SensitivityAdamW"]
