"""A learned annotator node in a real ComfyUI: its model is loaded once, handed to ComfyUI's model manager (a
ModelPatcher that `comfy.model_management` lists as loaded), reused on the next run, and freed on request.

Needs a ComfyUI checkout at COMFYUI_PATH (and COMFYUI_PYTHON, an interpreter with its requirements, if not this
one); skipped otherwise. The pack is imported by path as ComfyUI does; M-LSD's loader is swapped for one that
builds the net with random weights (the real file is not needed, and its sha256 would refuse a fake one).
"""
from __future__ import annotations

import textwrap

from .comfyui_host import REQUIRES_COMFYUI, run_in_comfyui

pytestmark = REQUIRES_COMFYUI

SCRIPT = textwrap.dedent("""
    import dataclasses, json, logging
    import comfy.model_management as mm
    from zeroconv_pack.annotators import registry
    from zeroconv_pack.annotators.learned.base import randomize
    from zeroconv_pack.annotators.learned.mlsd import MLSDLarge
    from zeroconv_pack.nodes.annotators import HOST_MODELS

    logs = []
    handler = logging.Handler(); handler.emit = lambda record: logs.append(record.getMessage())
    logging.getLogger("zeroconv_pack").addHandler(handler); logging.getLogger("zeroconv_pack").setLevel(logging.INFO)
    loads = []

    def loader(device):
        loads.append(device)
        return randomize(MLSDLarge(), seed=0, std=0.2).to(device)

    registry.ANNOTATORS["mlsd"] = dataclasses.replace(registry.get("mlsd"), loader=loader)
    node = pack.NODE_CLASS_MAPPINGS["ZeroConvMLSD"]()
    image = torch.rand(2, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    first = node.run(image, 96, value_threshold=0.1, distance_threshold=0.1)[0]
    managed = [m.model for m in mm.current_loaded_models if isinstance(m.model.model, MLSDLarge)]
    second = node.run(image, 96, value_threshold=0.1, distance_threshold=0.1)[0]
    freed = HOST_MODELS.free("mlsd")
    print(json.dumps({"loads": loads, "managed": len(managed), "shape": list(first.shape),
                      "same": bool(torch.equal(first, second)), "values": sorted(set(first.unique().tolist())),
                      "freed": freed, "logs": logs}))
""")


def test_learned_annotator_model_is_managed_by_comfyui_and_loaded_once() -> None:
    result = run_in_comfyui(SCRIPT)
    assert result["loads"] == ["cpu"], "loaded once (on ComfyUI's offload device), reused on the second run"
    assert result["managed"] == 1, "ComfyUI's model manager lists the annotator's ModelPatcher as loaded"
    assert result["shape"] == [2, 96, 128, 3] and result["same"]
    assert set(result["values"]) <= {0.0, 1.0}, "1-px white segments on black"
    assert result["freed"] == 1
    assert any("model managed by ComfyUI, runs on cpu" in line for line in result["logs"]), result["logs"]
