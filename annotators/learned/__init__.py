"""Annotators with learned weights (lllyasviel/Annotators weight files), registered into annotators.registry at import.

Module map: base.py (strict weight loading, batch tensors), hed.py (HED soft edges, HED scribble), mlsd.py
(M-LSD straight lines), openpose_nets.py + openpose_parse.py + openpose.py (body, hands, face), hf.py (hub
checkpoints through transformers), depth.py (MiDaS DPT-Hybrid depth and v1.0 normals, Depth Anything V2),
segmentation.py + palettes.json (ADE20K SegFormer, COCO Mask2Former). Importing builds no network and reads no
weights; transformers is imported only when a model that needs it is loaded.
"""
from __future__ import annotations

from ..registry import register
from . import depth, hed, lineart, mlsd, openpose, segmentation

SPECS = (*openpose.SPECS, *hed.SPECS, *mlsd.SPECS, *lineart.SPECS, *depth.SPECS, *segmentation.SPECS)

for _spec in SPECS:
    register(_spec)
