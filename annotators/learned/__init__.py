"""Annotators with learned weights (controlnet-formats.md §5.2), registered into annotators.registry at import.

Module map: base.py (strict weight loading, batch tensors), hed.py (HED soft edges, HED scribble), openpose_nets.py +
openpose_parse.py + openpose.py (body, hands, face). Importing builds no network and reads no weights; transformers
is imported only when a model that needs it is loaded.
"""
from __future__ import annotations

from ..registry import register
from . import hed, lineart, openpose

SPECS = (*openpose.SPECS, *hed.SPECS, *lineart.SPECS)

for _spec in SPECS:
    register(_spec)
