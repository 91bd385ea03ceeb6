"""ZeroConv: ControlNet (Zhang, Rao, Agrawala, ICCV 2023) for ComfyUI.

ComfyUI imports this folder by path, so everything below is relative. Importing does nothing but
build the node tables: no downloads, no environment changes, no ComfyUI needed.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
