"""ZeroConv: ControlNet (Zhang, Rao, Agrawala, ICCV 2023) for ComfyUI.

ComfyUI imports this folder by path, so everything below is relative. Importing does nothing but
build the node tables: no downloads, no environment changes, no ComfyUI needed.
"""
if __package__:  # imported as a package (ComfyUI, pip). pytest runs this file bare when the checkout's folder
    # name is not an identifier (`git clone ... ci-clone`): then there are no nodes to build
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
