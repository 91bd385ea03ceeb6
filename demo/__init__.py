"""`zeroconv demo`: the shipped world base and its ControlNet, generating with and without control (offline, CPU)."""
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"  # the package's models/: the demo world's files
