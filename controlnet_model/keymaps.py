"""Key tables as data: which prefixes map between formats. Only checkpoint code reads these tables."""
from __future__ import annotations

# init_from_unet: ControlNet prefix <- base U-Net prefix (cldm tool_add_control.py, diffusers from_unet).
# Every ControlNet key under these prefixes is copied from the U-Net; the rest must be in INIT_FRESH_PREFIXES.
INIT_FROM_UNET_PREFIXES: tuple[tuple[str, str], ...] = (
    ("time_embed.", "time_embed."),
    ("label_emb.", "label_emb."),
    ("input_blocks.", "input_blocks."),
    ("middle_block.", "middle_block."),
)
# Modules a fresh ControlNet creates itself: the condition encoder and the zero convolutions.
INIT_FRESH_PREFIXES: tuple[str, ...] = ("input_hint_block.", "zero_convs.", "middle_block_out.")

# Format detection: each format and the keys that must all be present (checked in this order).
# Kinds we recognise but do not load are listed too, so the error can say what the file is.
FORMAT_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("control_lora", ("lora_controlnet",)),
    ("union", ("control_add_embedding.linear_1.bias",)),
    ("diff", ("difference", "control_model.zero_convs.0.0.weight")),
    ("ldm_prefixed", ("control_model.zero_convs.0.0.weight", "control_model.input_hint_block.0.weight")),
    ("ldm", ("zero_convs.0.0.weight", "input_hint_block.0.weight")),
    ("diffusers", ("controlnet_cond_embedding.conv_in.weight", "controlnet_mid_block.weight")),
    ("t2i_adapter", ("adapter.body.0.resnets.0.block1.weight",)),
    ("t2i_adapter", ("body.0.in_conv.weight",)),
    ("t2i_adapter", ("conv_in.weight", "body.0.block1.weight")),
)
# Prefix that wraps ControlNet keys inside whole-model (v1.0) checkpoints; everything else there is dropped.
LDM_CONTROL_PREFIX = "control_model."
# Wrapper prefixes added by torch.compile and DataParallel, stripped before detection.
WRAPPER_PREFIXES: tuple[str, ...] = ("_orig_mod.", "module.")
