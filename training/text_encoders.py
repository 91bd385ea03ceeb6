"""Frozen CLIP text encoders of SD1.x, SD2.x and SDXL, run through open_clip's TextTransformer.

SD1.x and SDXL's first encoder are OpenAI CLIP ViT-L/14 stored in the Hugging Face layout; their keys are mapped
to open_clip's layout by the tables below (q/k/v are fused into one in_proj). SD2.x (ViT-H/14) and SDXL's second
encoder (ViT-bigG/14) are stored in open_clip's own layout. Layer choice and padding follow the original
embedders (ldm FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder, sgm FrozenOpenCLIPEmbedder2).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..controlnet_model.skeleton import skeleton

EOT_TOKEN = 49407


@dataclass(frozen=True)
class TextEncoderSpec:
    prefix: str  # key prefix of the encoder in the single file
    hf_layout: bool  # Hugging Face CLIPTextModel keys (mapped), else open_clip keys (as stored)
    penultimate: bool  # hidden states of the second-to-last layer, else of the last
    final_norm: bool  # apply ln_final to those hidden states
    pad_token: int  # padding after the end token: EOT (Hugging Face tokenizer of CLIP-L) or 0 (open_clip)
    quick_gelu: bool  # OpenAI CLIP's x * sigmoid(1.702 x) activation (ViT-L); GELU for LAION ViT-H/bigG
    pooled: bool  # also return the projected end-token embedding (SDXL's ADM vector)


TEXT_ENCODERS: dict[str, tuple[TextEncoderSpec, ...]] = {
    "SD1.x": (TextEncoderSpec("cond_stage_model.transformer.text_model.", True, False, True, EOT_TOKEN, True, False),),
    "SD2.x": (TextEncoderSpec("cond_stage_model.model.", False, True, True, 0, False, False),),
    "SDXL": (TextEncoderSpec("conditioner.embedders.0.transformer.text_model.", True, True, False, EOT_TOKEN, True, False),
             TextEncoderSpec("conditioner.embedders.1.model.", False, True, False, 0, False, True)),
}

# Hugging Face CLIPTextModel -> open_clip TextTransformer, 1:1 renames ({i} = layer index).
HF_TO_OPEN_CLIP: tuple[tuple[str, str], ...] = (
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.weight", "ln_final.weight"),
    ("final_layer_norm.bias", "ln_final.bias"),
    ("encoder.layers.{i}.layer_norm1.{p}", "transformer.resblocks.{i}.ln_1.{p}"),
    ("encoder.layers.{i}.layer_norm2.{p}", "transformer.resblocks.{i}.ln_2.{p}"),
    ("encoder.layers.{i}.mlp.fc1.{p}", "transformer.resblocks.{i}.mlp.c_fc.{p}"),
    ("encoder.layers.{i}.mlp.fc2.{p}", "transformer.resblocks.{i}.mlp.c_proj.{p}"),
    ("encoder.layers.{i}.self_attn.out_proj.{p}", "transformer.resblocks.{i}.attn.out_proj.{p}"),
)
# q, k and v projections concatenated (in that order) into open_clip's in_proj ({p} = weight or bias).
HF_FUSED_QKV = (("encoder.layers.{i}.self_attn.q_proj.{p}", "encoder.layers.{i}.self_attn.k_proj.{p}",
                 "encoder.layers.{i}.self_attn.v_proj.{p}"), "transformer.resblocks.{i}.attn.in_proj_{p}")
HF_IGNORED = ("embeddings.position_ids",)  # a buffer some files carry
OPEN_CLIP_IGNORED = ("logit_scale", "attn_mask")  # CLIP-model leftovers beside the text tower
PARAMS = ("weight", "bias")


def count_layers(state: Mapping[str, torch.Tensor], template: str) -> int:
    n = 0
    while template.format(i=n) in state:
        n += 1
    return n


def hf_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a CLIPTextModel state dict (prefix stripped) to open_clip's; unknown keys raise KeyError."""
    layers = count_layers(state, "encoder.layers.{i}.layer_norm1.weight")
    out, used = {}, set(HF_IGNORED) & set(state)
    for i in range(layers):
        for p in PARAMS:
            sources = [s.format(i=i, p=p) for s in HF_FUSED_QKV[0]]
            out[HF_FUSED_QKV[1].format(i=i, p=p)] = torch.cat([state[s] for s in sources])
            used.update(sources)
    for src, dst in HF_TO_OPEN_CLIP:
        for i in range(layers) if "{i}" in src else [0]:
            for p in PARAMS if "{p}" in src else [""]:
                key = src.format(i=i, p=p)
                if key in state:
                    out[dst.format(i=i, p=p)] = state[key]
                    used.add(key)
    unmatched = sorted(set(state) - used)
    if unmatched:
        raise KeyError(f"text encoder keys with no open_clip name: {unmatched[:8]} ({len(unmatched)} in all)")
    return out


@functools.lru_cache(maxsize=1)
def tokenizer():
    """open_clip's SimpleTokenizer: the CLIP BPE vocabulary ships inside the package, so it works offline."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(captions: list[str], context_length: int, pad_token: int) -> torch.Tensor:
    """(B, context_length) ids: start, text, end (truncated to fit), then `pad_token`."""
    tokens = tokenizer()(captions, context_length=context_length)
    ends = (tokens == EOT_TOKEN).int().argmax(dim=1)
    positions = torch.arange(context_length)[None]
    return torch.where(positions > ends[:, None], torch.full_like(tokens, pad_token), tokens)


class FrozenTextEncoder(nn.Module):
    """One CLIP text tower and how its conditioning is taken (layer, final norm, padding, pooled output)."""

    def __init__(self, spec: TextEncoderSpec, width: int, layers: int, heads: int, context_length: int,
                 vocab_size: int, mlp_ratio: float, output_dim: int | None):
        super().__init__()
        from open_clip.transformer import QuickGELU, TextTransformer

        self.spec = spec
        act = QuickGELU if spec.quick_gelu else nn.GELU
        self.tower = TextTransformer(context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
                                     layers=layers, mlp_ratio=mlp_ratio, output_dim=output_dim,
                                     proj_type="linear" if output_dim else "none", act_layer=act)

    @property
    def width(self) -> int:
        return self.tower.token_embedding.weight.shape[1]

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Captions -> (hidden states (B, T, width), pooled projection (B, D) or None)."""
        tower, spec = self.tower, self.spec
        device = tower.token_embedding.weight.device
        tokens = tokenize(captions, tower.positional_embedding.shape[0], spec.pad_token).to(device)
        x = tower.token_embedding(tokens) + tower.positional_embedding.to(tower.token_embedding.weight.dtype)
        mask = tower.attn_mask.to(device=device, dtype=x.dtype) if tower.attn_mask is not None else None
        blocks = tower.transformer.resblocks
        hidden = None
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=mask)
            if i == len(blocks) - 2:
                hidden = x
        chosen = hidden if spec.penultimate else x
        context = tower.ln_final(chosen) if spec.final_norm else chosen
        pooled = None
        if spec.pooled:
            last = tower.ln_final(x)[torch.arange(x.shape[0], device=device), tokens.argmax(dim=-1)]
            pooled = last @ tower.text_projection if tower.text_projection is not None else last
        return context, pooled


def build_text_encoder(spec: TextEncoderSpec, state: Mapping[str, torch.Tensor], heads: int | None = None
                       ) -> FrozenTextEncoder:
    """An encoder shaped by its (prefix-stripped) weights; heads default to width / 64 as in every SD encoder."""
    tower_state = hf_to_open_clip(state) if spec.hf_layout else {
        k: v for k, v in state.items() if k not in OPEN_CLIP_IGNORED}
    width = tower_state["token_embedding.weight"].shape[1]
    layers = count_layers(tower_state, "transformer.resblocks.{i}.ln_1.weight")
    proj = tower_state.get("text_projection") if spec.pooled else None
    if not spec.pooled:
        tower_state.pop("text_projection", None)
    mlp = tower_state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    encoder = skeleton(lambda: FrozenTextEncoder(spec, width, layers, heads or max(1, width // 64),
                                                 tower_state["positional_embedding"].shape[0],
                                                 tower_state["token_embedding.weight"].shape[0], mlp,
                                                 None if proj is None else proj.shape[1]))
    expected = set(encoder.tower.state_dict())
    missing, unexpected = sorted(expected - set(tower_state)), sorted(set(tower_state) - expected)
    if missing or unexpected:
        raise KeyError(f"text encoder at {spec.prefix}: missing {missing[:6]}, unexpected {unexpected[:6]}; "
                       "is the checkpoint complete?")
    encoder.tower.load_state_dict({k: v.float() for k, v in tower_state.items()}, strict=True, assign=True)
    encoder.tower.attn_mask = encoder.tower.build_causal_mask()
    return encoder
