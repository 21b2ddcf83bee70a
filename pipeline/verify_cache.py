"""Check a latent cache: every recorded file exists with its size and decodes (CRC32C checksums).

Reads the whole cache (``--quick``: only file presence and sizes, seconds even for ImageNet).
Prints one line per problem, naming the file, and exits 0 (intact), 1 (damaged: re-run the
encode command, which re-encodes exactly the damaged shards) or 2 (not a cache / unreadable).

Example:
  python pipeline/verify_cache.py data/cache/imagenet256      # what `just verify-cache` runs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sfd.cli import Parser, run_cli
from sfd.data.cache import FIX_HINT, CacheError, LatentCache


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="pipeline/verify_cache.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("cache", help="latent cache directory")
    ap.add_argument("--quick", action="store_true", help="check file presence and sizes only (no decoding)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cache = LatentCache.open(args.cache)
        done = int(cache.shard_done().sum())
        damage = cache.find_damage(deep=not args.quick, progress=sys.stderr.isatty())
        stats_missing = any(k not in cache.group for k in ("texture_std", "semantic_std"))
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for part, problems in damage.items():
        for p in problems:
            print(f"{part}: {p}")
    pending = cache.num_shards - done
    state = "complete" if pending == 0 and not stats_missing else (
        f"unfinished ({pending} shard(s) not encoded{', no statistics' if stats_missing else ''})"
    )
    how = "file presence and sizes" if args.quick else "every file decoded"
    if damage:
        print(f"error: {len(damage)} damaged part(s) in {cache.path} ({how}); {state}. Fix: {FIX_HINT}", file=sys.stderr)
        return 1
    print(f"ok: {cache.path}: {done}/{cache.num_shards} shards intact ({how}); {state}")
    return 0


if __name__ == "__main__":
    run_cli(main)  # exit 0 intact, 1 damaged, 2 a user error (one `error:` line)
