"""Key tables as data: marker keys per format and the renames between formats (diffusers scripts/convert_original_controlnet_to_diffusers.py and ComfyUI comfy/utils.py unet_to_diffusers).

Only checkpoint code reads these tables. Rename rules are (source prefix, target prefix) pairs; the longest
matching prefix wins and the rest of the key is kept. Patterns with `{name}` placeholders are expanded by the
checkpoint code over index ranges taken from the architecture. Every rule is 1:1, so swapping the pair gives the
inverse conversion.
"""
from __future__ import annotations

# init_from_unet: ControlNet prefix <- base U-Net prefix (cldm tool_add_control.py, diffusers from_unet).
# Every ControlNet key under these prefixes is copied from the U-Net; the rest must be in INIT_FRESH_PREFIXES.
# Diff ControlNets and Control-LoRA are stored relative to the same twins (formats §2.4-2.5).
INIT_FROM_UNET_PREFIXES: tuple[tuple[str, str], ...] = (
    ("time_embed.", "time_embed."),
    ("label_emb.", "label_emb."),
    ("input_blocks.", "input_blocks."),
    ("middle_block.", "middle_block."),
)
# Modules a fresh ControlNet creates itself: the condition encoder and the zero convolutions.
INIT_FRESH_PREFIXES: tuple[str, ...] = ("input_hint_block.", "zero_convs.", "middle_block_out.")
# Prefixes a base U-Net's keys may carry (bare module, ComfyUI BaseModel, whole SD checkpoint).
BASE_UNET_PREFIXES: tuple[str, ...] = ("", "diffusion_model.", "model.diffusion_model.")

# ---- format detection -----------------------------------------------------------------------------------
# Each format and the full keys that must all be present, checked in this order (the first match wins, so
# the more specific layouts come first). Kinds we recognise but do not load are listed too, so the error can
# say what the file is. Values are CheckpointFormat values.
FORMAT_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("control_lora", ("lora_controlnet",)),
    ("union", ("control_add_embedding.linear_1.bias",)),
    ("union", ("task_embedding", "spatial_ch_projs.weight")),
    ("controlnet_xs", ("control_to_base_for_conv_in.weight",)),
    ("diff", ("difference", "control_model.zero_convs.0.0.weight")),
    ("ldm_full", ("control_model.zero_convs.0.0.weight", "model.diffusion_model.out.2.weight")),
    ("ldm_prefixed", ("control_model.zero_convs.0.0.weight", "control_model.input_hint_block.0.weight")),
    ("ldm", ("zero_convs.0.0.weight", "input_hint_block.0.weight")),
    ("diffusers", ("controlnet_cond_embedding.conv_in.weight", "controlnet_mid_block.weight")),
    ("t2i_adapter", ("adapter.body.0.resnets.0.block1.weight",)),
    ("t2i_adapter", ("body.0.in_conv.weight",)),
    ("t2i_adapter", ("conv_in.weight", "body.0.block1.weight")),
    ("t2i_style", ("style_embedding", "proj")),
    ("stable_cascade", ("backbone.0.0.weight",)),
    ("stable_cascade", ("backbone.10.blocks.0.weight",)),
    ("lllite", ("lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight",)),
    ("lllite", ("lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.conditioning1.0.weight",)),
    # transformer ControlNets, in the order of ComfyUI comfy/controlnet.py load_controlnet_state_dict
    ("flux_xlabs", ("controlnet_blocks.0.weight", "double_blocks.0.img_attn.norm.key_norm.scale")),
    ("sd35", ("controlnet_blocks.0.weight", "pos_embed_input.proj.weight",
              "transformer_blocks.0.adaLN_modulation.1.bias")),
    ("sd3_diffusers", ("controlnet_blocks.0.weight", "pos_embed_input.proj.weight")),
    ("flux_instantx", ("controlnet_blocks.0.weight", "controlnet_x_embedder.weight")),
    ("flux_mistoline", ("controlnet_blocks.0.linear.weight",)),
    ("dit", ("controlnet_blocks.0.weight",)),
    ("dit", ("after_proj_list.0.bias",)),
    ("ip_adapter", ("ip_adapter.1.to_k_ip.weight",)),
    ("sd_model", ("model.diffusion_model.out.2.weight",)),
)

# Union (xinsir ControlNet++): its own modules keep their file names in every layout (diffusers-keyed release,
# our native save); the ControlNet part follows LDM_DIFFUSERS_RULES or the bare LDM layout (DIFFUSERS_MARKER).
UNION_EXTRA_RULES: tuple[tuple[str, str], ...] = (
    ("task_embedding", "task_embedding"),
    ("transformer_layes.", "transformer_layes."),
    ("spatial_ch_projs.", "spatial_ch_projs."),
    ("control_add_embedding.", "control_add_embedding."),
)
DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"

# Wrapper prefixes added by torch.compile and DataParallel; stripped when every key has one.
WRAPPER_PREFIXES: tuple[str, ...] = ("_orig_mod.", "module.")

# ---- LDM layouts (A: v1.0 full, B: pruned, C: diff, D: v1.1) ----------------------------------------------
# The ControlNet inside a whole-model v1.0 file, and the prefix-stripped (bare) layout everything converts to.
LDM_PREFIXED_RULES: tuple[tuple[str, str], ...] = (("control_model.", ""),)
LDM_BARE_RULES: tuple[tuple[str, str], ...] = (("", ""),)
# What else a whole-model v1.0 file holds (ControlLDM: the SD model and its schedule buffers): left out on load.
LDM_FULL_OTHER_PREFIXES: tuple[str, ...] = (
    "model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.", "embedding_manager.",
)
LDM_FULL_OTHER_KEYS: tuple[str, ...] = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "scale_factor",
)
# Diff files: the scalar marker, and which stored keys are deltas (those with a U-Net twin, INIT_FROM_UNET_PREFIXES).
DIFF_MARKER = "difference"
# Control-LoRA: the marker, and the factor suffixes; weight = base + up.flatten(1) @ down.flatten(1).
CONTROL_LORA_MARKER = "lora_controlnet"
CONTROL_LORA_UP, CONTROL_LORA_DOWN = ".up", ".down"
# Each LDM-named format: (rename rules to bare LDM keys, prefixes and keys of other things the file holds,
# left out of the ControlNet). Anything else that the rules do not place is an error.
LDM_LAYOUTS: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...]]] = {
    "ldm_full": (LDM_PREFIXED_RULES, LDM_FULL_OTHER_PREFIXES, LDM_FULL_OTHER_KEYS),
    "ldm_prefixed": (LDM_PREFIXED_RULES, (), ()),
    "ldm": (LDM_BARE_RULES, (), ()),
    "diff": (LDM_PREFIXED_RULES, (), (DIFF_MARKER,)),
    "control_lora": (LDM_BARE_RULES, (), (CONTROL_LORA_MARKER,)),
}

# ---- sidecar configuration (not in the weights) -------------------------------------------------------------
# v1.1 `.yaml` beside the file: where the ControlNet's params sit, and which we read (the weights fix the rest).
YAML_CONTROL_PARAMS: tuple[str, ...] = ("model", "params", "control_stage_config", "params")
YAML_HEAD_FIELDS: tuple[str, ...] = ("num_heads", "num_head_channels")
YAML_POOLING_FIELD = "global_average_pooling"
# Shuffle models need global average pooling; third-party files without a config are recognised by name.
SHUFFLE_NAME_SUFFIXES: tuple[str, ...] = ("_shuffle", "_shuffle_fp16")

# ---- LDM <-> diffusers (formats §2.3) ---------------------------------------------------------------------
# (LDM pattern, diffusers pattern, index set). The index set names the placeholder values the pattern is
# expanded over (checkpoint.py builds them from the layout); "" means the rule is used as written.
# `{ldm_res}`/`{diffusers_res}` range over RES_SUBKEYS, the ResBlock sub-renames.
LDM_DIFFUSERS_RULES: tuple[tuple[str, str, str], ...] = (
    ("time_embed.0.", "time_embedding.linear_1.", ""),
    ("time_embed.2.", "time_embedding.linear_2.", ""),
    ("label_emb.0.0.", "add_embedding.linear_1.", ""),
    ("label_emb.0.2.", "add_embedding.linear_2.", ""),
    ("input_blocks.0.0.", "conv_in.", ""),
    ("input_hint_block.0.", "controlnet_cond_embedding.conv_in.", ""),
    ("input_hint_block.{h}.", "controlnet_cond_embedding.blocks.{k}.", "hint_blocks"),
    ("input_hint_block.14.", "controlnet_cond_embedding.conv_out.", ""),
    ("input_blocks.{i}.0.{ldm_res}", "down_blocks.{b}.resnets.{j}.{diffusers_res}", "down_res"),
    ("input_blocks.{i}.1.", "down_blocks.{b}.attentions.{j}.", "down_attn"),
    ("input_blocks.{i}.0.op.", "down_blocks.{b}.downsamplers.0.conv.", "downsample"),
    ("middle_block.0.{ldm_res}", "mid_block.resnets.0.{diffusers_res}", "res"),
    ("middle_block.1.", "mid_block.attentions.0.", "mid_attn"),
    ("middle_block.2.{ldm_res}", "mid_block.resnets.1.{diffusers_res}", "res"),
    ("zero_convs.{n}.0.", "controlnet_down_blocks.{n}.", "zero_convs"),
    ("middle_block_out.0.", "controlnet_mid_block.", ""),
)
RES_SUBKEYS: tuple[tuple[str, str], ...] = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
# Hint encoder: LDM Sequential index h = 2k + 2 for diffusers block k (SiLUs take the odd indices).
HINT_BLOCK_COUNT = 6
# Templates that reveal the diffusers layout of a state dict (counted while present).
DIFFUSERS_LEVEL_KEY = "down_blocks.{n}.resnets.0.conv1.weight"
DIFFUSERS_RES_KEY = "down_blocks.0.resnets.{n}.conv1.weight"
DIFFUSERS_ATTN_KEY = "down_blocks.{b}.attentions.0.proj_in.weight"
DIFFUSERS_MID_ATTN_KEY = "mid_block.attentions.0.proj_in.weight"
# Shape fixes applied after renaming: (key, transform name). Used when config.json says the hint is BGR.
BGR_HINT_FIXES: tuple[tuple[str, str], ...] = (("input_hint_block.0.weight", "flip_input_channels"),)

DIFFUSERS_CONFIG_NAME = "config.json"

# ---- transformer ControlNets (Flux, SD3): diffusers layout -> our Flux-style layout (dit_blocks.py) -----------
# (diffusers pattern, our pattern, index set): "" as written, "double" over joint / double blocks {i}, "single"
# over single-stream blocks {i}. Names from diffusers transformer_flux.py / transformer_sd3.py and ComfyUI
# comfy/ldm/flux/layers.py.
DIT_DIFFUSERS_RULES: tuple[tuple[str, str, str], ...] = (
    ("time_text_embed.timestep_embedder.linear_1.", "time_in.in_layer.", ""),
    ("time_text_embed.timestep_embedder.linear_2.", "time_in.out_layer.", ""),
    ("time_text_embed.guidance_embedder.linear_1.", "guidance_in.in_layer.", ""),
    ("time_text_embed.guidance_embedder.linear_2.", "guidance_in.out_layer.", ""),
    ("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer.", ""),
    ("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer.", ""),
    ("context_embedder.", "txt_in.", ""),
    ("x_embedder.", "img_in.", ""),  # Flux: a Linear over patchified latents
    ("pos_embed.proj.", "img_in.proj.", ""),  # SD3: a patch-embedding conv ...
    ("pos_embed.pos_embed", "pos_embed", ""),  # ... and its stored position table
    ("controlnet_x_embedder.", "pos_embed_input.", ""),
    ("pos_embed_input.", "pos_embed_input.", ""),
    ("controlnet_blocks.", "controlnet_blocks.", ""),
    ("controlnet_single_blocks.", "controlnet_single_blocks.", ""),
    ("controlnet_mode_embedder.", "controlnet_mode_embedder.", ""),
    ("transformer_blocks.{i}.norm1.linear.", "double_blocks.{i}.img_mod.lin.", "double"),
    ("transformer_blocks.{i}.norm1_context.linear.", "double_blocks.{i}.txt_mod.lin.", "double"),
    ("transformer_blocks.{i}.attn.norm_q.weight", "double_blocks.{i}.img_attn.norm.query_norm.scale", "double"),
    ("transformer_blocks.{i}.attn.norm_k.weight", "double_blocks.{i}.img_attn.norm.key_norm.scale", "double"),
    ("transformer_blocks.{i}.attn.norm_added_q.weight", "double_blocks.{i}.txt_attn.norm.query_norm.scale", "double"),
    ("transformer_blocks.{i}.attn.norm_added_k.weight", "double_blocks.{i}.txt_attn.norm.key_norm.scale", "double"),
    ("transformer_blocks.{i}.attn.to_out.0.", "double_blocks.{i}.img_attn.proj.", "double"),
    ("transformer_blocks.{i}.attn.to_add_out.", "double_blocks.{i}.txt_attn.proj.", "double"),
    ("transformer_blocks.{i}.ff.net.0.proj.", "double_blocks.{i}.img_mlp.0.", "double"),
    ("transformer_blocks.{i}.ff.net.2.", "double_blocks.{i}.img_mlp.2.", "double"),
    ("transformer_blocks.{i}.ff_context.net.0.proj.", "double_blocks.{i}.txt_mlp.0.", "double"),
    ("transformer_blocks.{i}.ff_context.net.2.", "double_blocks.{i}.txt_mlp.2.", "double"),
    ("single_transformer_blocks.{i}.norm.linear.", "single_blocks.{i}.modulation.lin.", "single"),
    ("single_transformer_blocks.{i}.proj_out.", "single_blocks.{i}.linear2.", "single"),
    ("single_transformer_blocks.{i}.attn.norm_q.weight", "single_blocks.{i}.norm.query_norm.scale", "single"),
    ("single_transformer_blocks.{i}.attn.norm_k.weight", "single_blocks.{i}.norm.key_norm.scale", "single"),
)
# Fused projections: (our key, diffusers keys concatenated along dim 0 in this order, index set); `{p}` is
# "weight" and "bias". The inverse is a split at the sources' sizes.
DIT_DIFFUSERS_FUSED: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("double_blocks.{i}.img_attn.qkv.{p}", ("transformer_blocks.{i}.attn.to_q.{p}", "transformer_blocks.{i}.attn.to_k.{p}",
                                            "transformer_blocks.{i}.attn.to_v.{p}"), "double"),
    ("double_blocks.{i}.txt_attn.qkv.{p}", ("transformer_blocks.{i}.attn.add_q_proj.{p}",
                                            "transformer_blocks.{i}.attn.add_k_proj.{p}",
                                            "transformer_blocks.{i}.attn.add_v_proj.{p}"), "double"),
    ("single_blocks.{i}.linear1.{p}", ("single_transformer_blocks.{i}.attn.to_q.{p}",
                                       "single_transformer_blocks.{i}.attn.to_k.{p}",
                                       "single_transformer_blocks.{i}.attn.to_v.{p}",
                                       "single_transformer_blocks.{i}.proj_mlp.{p}"), "single"),
)
# Stability's SD3.5 ControlNets (ComfyUI dit_embedder.py names; the MMDIT_MAP_BASIC diffusers aliases of the
# embedders accepted too). Their image-only blocks are counted as "double".
DIT_SD35_RULES: tuple[tuple[str, str, str], ...] = (
    ("t_embedder.mlp.0.", "time_in.in_layer.", ""),
    ("t_embedder.mlp.2.", "time_in.out_layer.", ""),
    ("time_text_embed.timestep_embedder.linear_1.", "time_in.in_layer.", ""),
    ("time_text_embed.timestep_embedder.linear_2.", "time_in.out_layer.", ""),
    ("y_embedder.mlp.0.", "vector_in.in_layer.", ""),
    ("y_embedder.mlp.2.", "vector_in.out_layer.", ""),
    ("time_text_embed.text_embedder.linear_1.", "vector_in.in_layer.", ""),
    ("time_text_embed.text_embedder.linear_2.", "vector_in.out_layer.", ""),
    ("pos_embed_input.", "pos_embed_input.", ""),
    ("controlnet_blocks.", "controlnet_blocks.", ""),
    ("transformer_blocks.{i}.adaLN_modulation.1.", "blocks.{i}.mod.lin.", "double"),
    ("transformer_blocks.{i}.attn.qkv.", "blocks.{i}.attn.qkv.", "double"),
    ("transformer_blocks.{i}.attn.proj.", "blocks.{i}.attn.proj.", "double"),
    ("transformer_blocks.{i}.attn.ln_q.weight", "blocks.{i}.attn.norm.query_norm.scale", "double"),
    ("transformer_blocks.{i}.attn.ln_k.weight", "blocks.{i}.attn.norm.key_norm.scale", "double"),
    ("transformer_blocks.{i}.mlp.fc1.", "blocks.{i}.mlp.0.", "double"),
    ("transformer_blocks.{i}.mlp.fc2.", "blocks.{i}.mlp.2.", "double"),
)
# What an SD3.5 file may also hold and we do not load: the host's embedders (borrowed from the base at run time,
# ComfyUI ControlNetSD35.pre_run) and the control_type scalar (read on its own).
DIT_SD35_OTHER: tuple[str, ...] = ("x_embedder.", "pos_embed.proj.", "orig_y_embedder.", "control_type")
DIT_SD35_CONTROL_TYPE = "control_type"
# Each diffusers-like layout: (rules, fused groups, other prefixes left out, {index set: block-count template}).
DIT_LAYOUTS: dict[str, tuple[tuple, tuple, tuple[str, ...], dict[str, str]]] = {
    "flux_instantx": (DIT_DIFFUSERS_RULES, DIT_DIFFUSERS_FUSED, (),
                      {"double": "transformer_blocks.{n}.norm1.linear.weight",
                       "single": "single_transformer_blocks.{n}.norm.linear.weight"}),
    "sd3_diffusers": (DIT_DIFFUSERS_RULES, DIT_DIFFUSERS_FUSED, (),
                      {"double": "transformer_blocks.{n}.norm1.linear.weight"}),
    "sd35": (DIT_SD35_RULES, (), DIT_SD35_OTHER, {"double": "transformer_blocks.{n}.adaLN_modulation.1.weight"}),
}
# Flux-layout files (XLabs, Mistoline) need only Mistoline's one rename (ComfyUI convert_mistoline).
DIT_NATIVE_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "flux_xlabs": (("", ""),),
    "flux_mistoline": (("single_controlnet_blocks.", "controlnet_single_blocks."), ("", "")),
}
# ---- T2I-Adapters (t2i_adapter.py; ComfyUI load_t2i_adapter, diffusers models/adapter.py) ----------------
# Our module names are TencentARC's originals; these rules map each other layout onto them, as (source pattern,
# target pattern, index set). Index sets: "" as written, "levels" {i, n = i*R}, "blocks" {i, j, n = i*R + j},
# with R the residual blocks per level, all counted from the file (T2I_*_KEY templates).
T2I_DIFFUSERS_PREFIX = "adapter."
T2I_DIFFUSERS_FULL_RULES: tuple[tuple[str, str, str], ...] = (
    ("adapter.conv_in.", "conv_in.", ""),
    ("adapter.body.{i}.in_conv.", "body.{n}.in_conv.", "levels"),
    ("adapter.body.{i}.resnets.{j}.", "body.{n}.", "blocks"),
)
T2I_DIFFUSERS_LIGHT_RULES: tuple[tuple[str, str, str], ...] = (
    ("adapter.body.{i}.in_conv.", "body.{i}.in_conv.", "levels"),
    ("adapter.body.{i}.out_conv.", "body.{i}.out_conv.", "levels"),
    ("adapter.body.{i}.resnets.{j}.", "body.{i}.body.{j}.", "blocks"),
)
T2I_ORIGINAL_RULES: tuple[tuple[str, str], ...] = (("", ""),)
T2I_DIFFUSERS_LEVEL_KEY = "adapter.body.{n}.resnets.0.block1.weight"
T2I_DIFFUSERS_RES_KEY = "adapter.body.0.resnets.{n}.block1.weight"
T2I_LIGHT_MARKER = "body.0.out_conv.weight"  # after renaming; TencentARC light (colour) adapters
T2I_LIGHT_LEVEL_KEY = "body.{n}.in_conv.weight"
T2I_LIGHT_RES_KEY = "body.0.body.{n}.block1.weight"
T2I_FULL_BLOCK_KEY = "body.{n}.block1.weight"
T2I_FULL_RES_BLOCKS = 2  # residual blocks per level of full adapters when no config.json says (ComfyUI nums_rb=2)
T2I_DOWN_CONV_SUFFIX = "down_opt.op.weight"  # full adapters downsampling by a strided conv instead of pooling
# conv_in input widths of SDXL adapters (1 or 3 image channels x 16 x 16); others are SD1.x (x 8 x 8)
T2I_XL_CONV_IN_WIDTHS: tuple[int, ...] = (256, 768)
