"""The ControlNet network, host-independent (Zhang, Rao, Agrawala, ICCV 2023).

Read in this order: config.py (architectures as data), blocks.py and layout.py (the LDM U-Net parts),
network.py (the ControlNet), union.py (xinsir's Union ControlNet on top of it), t2i_adapter.py (T2I-Adapters),
unet.py (the locked base), residuals.py (where residuals and adapter features enter a U-Net and how they are
scaled), from_unet.py (a fresh ControlNet from a U-Net), hint.py (fitting the control image), checkpoint.py
(reading and writing files). Transformer (Flux, SD3/SD3.5) ControlNets: dit_blocks.py (shared blocks),
flux_controlnet.py, sd3_controlnet.py, dit_control.py (where their residuals go, one step of control),
dit_checkpoint.py (loading).
"""
from .config import PRESETS, ControlNetConfig, PredictionType, check_compatible, preset
from .from_unet import init_from_unet
from .hint import HintFit, fit_hint, image_to_hint
from .network import ControlNet, ControlNetOutput
from .residuals import (AdapterUnit, ControlMode, ControlSettings, ControlUnit, Residuals, adapter_features,
                        compute_residuals, ldm_unet_forward, output_scales, residuals_injected, run_adapter, run_control)
from .schedule import StrengthSchedule
from .t2i_adapter import AdapterConfig, AdapterKind, AdapterOutput, T2IAdapter
from .union import UNION_TYPES, UnionCondition, UnionControlNet, union_type_index
from .unet import UNetModel

__all__ = [
    "PRESETS", "ControlNetConfig", "PredictionType", "check_compatible", "preset", "init_from_unet", "HintFit",
    "fit_hint", "image_to_hint", "ControlNet", "ControlNetOutput", "ControlMode", "ControlSettings", "ControlUnit",
    "compute_residuals", "ldm_unet_forward", "output_scales", "residuals_injected", "run_control",
    "StrengthSchedule", "UNetModel", "AdapterUnit", "Residuals", "adapter_features", "run_adapter", "AdapterConfig",
    "AdapterKind", "AdapterOutput", "T2IAdapter", "UNION_TYPES", "UnionCondition", "UnionControlNet",
    "union_type_index",
]
