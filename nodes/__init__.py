"""The graph nodes, registered from an explicit list of modules (one per node family)."""
from . import annotators, apply, compose, loaders, train, world

_FAMILIES = (loaders, apply, compose, annotators, train, world)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _family in _FAMILIES:
    for _node_id, _cls in _family.NODE_CLASS_MAPPINGS.items():
        if _node_id in NODE_CLASS_MAPPINGS:
            raise ValueError(f"node id {_node_id} is registered twice (in {_family.__name__})")
        NODE_CLASS_MAPPINGS[_node_id] = _cls
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)
