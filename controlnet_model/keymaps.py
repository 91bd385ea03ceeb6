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

# LDM <-> diffusers, as (LDM prefix, diffusers prefix) pairs (controlnet-formats.md §2.3). Index-dependent
# rules are templates expanded over the layout by checkpoint code; every rule is 1:1 so the inverse is free.
DIFFUSERS_FIXED: tuple[tuple[str, str], ...] = (
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("input_hint_block.0.", "controlnet_cond_embedding.conv_in."),
    ("input_hint_block.14.", "controlnet_cond_embedding.conv_out."),
    ("middle_block_out.0.", "controlnet_mid_block."),
)
DIFFUSERS_HINT_BLOCK = ("input_hint_block.{ldm}.", "controlnet_cond_embedding.blocks.{k}.")  # ldm = 2k + 2, k < 6
DIFFUSERS_RES_SUBKEYS: tuple[tuple[str, str], ...] = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
DIFFUSERS_DOWN_RES = ("input_blocks.{i}.0.", "down_blocks.{b}.resnets.{j}.")
DIFFUSERS_DOWN_ATTN = ("input_blocks.{i}.1.", "down_blocks.{b}.attentions.{j}.")
DIFFUSERS_DOWNSAMPLE = ("input_blocks.{i}.0.op.", "down_blocks.{b}.downsamplers.0.conv.")
DIFFUSERS_MID = (("middle_block.0.", "mid_block.resnets.0."), ("middle_block.2.", "mid_block.resnets.1."))
DIFFUSERS_MID_ATTN = ("middle_block.1.", "mid_block.attentions.0.")
DIFFUSERS_ZERO_CONV = ("zero_convs.{n}.0.", "controlnet_down_blocks.{n}.")
DIFFUSERS_WEIGHT_NAMES: tuple[str, ...] = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
