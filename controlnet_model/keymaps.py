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
