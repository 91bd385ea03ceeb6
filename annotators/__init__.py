"""Control maps from pictures (the preprocessors of lllyasviel/ControlNet and ControlNet-v1-1-nightly). Module map:

common.py (image conventions, AnnotatorSpec/ParamSpec), registry.py (the table, `annotate`), classical.py (the
weight-free specs) with edges.py, scribble.py, normal.py, misc.py; pose.py (OpenPose JSON and drawing);
weights.py + weights_manifest.json (learned weights: find, download, verify); cli.py (`zeroconv fetch-weights`);
learned/ (networks with weights, registered into the table when present).
"""
