"""`zeroconv fetch-weights`: download (or check) annotator weights from the manifest, with progress and hashes."""
from __future__ import annotations

import argparse
import logging

from .weights import WeightEntry, fetch_weights, load_manifest

logger = logging.getLogger(__name__)


def _expand(names: list[str], manifest: dict[str, WeightEntry]) -> list[str]:
    """File names as given, or an annotator name standing for every file it uses."""
    files: list[str] = []
    for name in names:
        matches = [n for n, e in manifest.items() if n == name or name in e.used_by]
        if not matches:
            annotators = sorted({a for e in manifest.values() for a in e.used_by})
            raise ValueError(f"{name!r} is neither a weight file nor an annotator in the manifest; files: "
                             f"{sorted(manifest)}; annotators: {annotators}")
        files += [m for m in matches if m not in files]
    return files


def run_fetch_weights(args: argparse.Namespace) -> int:
    """Fetch and verify the chosen weights; exit code 0 when all are present and verified."""
    manifest = load_manifest()
    if args.list:
        for entry in manifest.values():
            size = f"{entry.size / 1e6:.1f} MB" if entry.size else "size ?"
            logger.info("%-32s %10s  %s  used by %s", entry.name, size, entry.repo_id, ", ".join(entry.used_by))
        return 0
    if not args.all and not args.names:
        raise ValueError("name the weights to fetch (file or annotator names), or pass --all; --list shows them")
    names = list(manifest) if args.all else _expand(args.names, manifest)
    failed = 0
    for name in names:
        try:
            path = fetch_weights([name], offline=args.offline, directory=args.dir, progress=True, manifest=manifest)
        except (FileNotFoundError, ValueError) as exc:  # report every file, then fail once
            logger.error("missing  %s: %s", name, exc)
            failed += 1
        else:
            logger.info("ok       %s", path[0])
    if failed:
        logger.error("%d of %d weight files are missing or failed verification", failed, len(names))
    return 1 if failed else 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the fetch-weights subcommand."""
    parser = subparsers.add_parser("fetch-weights", help="download and verify annotator weights",
                                   description=__doc__)
    parser.add_argument("names", nargs="*", help="weight files or annotator names (e.g. hed, openpose)")
    parser.add_argument("--all", action="store_true", help="every file in the manifest")
    parser.add_argument("--offline", action="store_true", default=None,
                        help="never download: only find and verify local files, and fail naming any missing "
                             "(also when ZEROCONV_OFFLINE=1 or HF_HUB_OFFLINE=1)")
    parser.add_argument("--dir", default=None, help="folder to look in and download to (default: ComfyUI "
                                                    "models/annotators, ZEROCONV_ANNOTATOR_DIR, or the hub cache)")
    parser.add_argument("--list", action="store_true", help="list the manifest and exit")
    parser.set_defaults(func=run_fetch_weights)
