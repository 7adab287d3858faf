"""effrun-cache: list and prune the stage cache (effrun/cache.py).

    effrun-cache list  [--dir DIR]
    effrun-cache prune [--dir DIR] [--older-than DAYS] [--unused] [--stage S] [--all] [--dry-run]

`--dir` defaults to the `cache.dir` default of the run config (outputs/cache, relative to the
current directory, or $EFFRUN_STAGE_CACHE_DIR). prune removes the entries that match every
filter given: not used (created or reused) for DAYS days, never reused, of stage S; `--all`
matches every entry. An entry a running job holds (computing or reading it) is skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from effrun import cache
from effrun.schema import STAGE_ORDER, CacheConfig

PROG = "effrun-cache"
SHOWN_USERS = 3  # a row names at most this many runs that reused the entry


def default_dir() -> str:
    """cache.dir's default, from its one home (effrun.schema.CacheConfig)."""
    return str(OmegaConf.structured(CacheConfig).dir)


def parse(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=None, help=f"the stage cache (default: {default_dir()})")
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="one row per entry")
    prune = sub.add_parser("prune", parents=[common], help="remove entries")
    prune.add_argument("--older-than", type=float, metavar="DAYS",
                       help="not created or reused for DAYS days")
    prune.add_argument("--unused", action="store_true", help="never reused by another run")
    prune.add_argument("--stage", choices=[s for s in STAGE_ORDER if s != "benchmark"])
    prune.add_argument("--all", action="store_true", help="every entry")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    args = parser.parse_args(argv)
    if args.command == "prune" and not (args.older_than is not None or args.unused
                                        or args.stage or args.all):
        parser.error("prune: choose what goes: --older-than DAYS, --unused, --stage S or --all")
    return args


def last_used(entry: dict) -> float:
    """When the entry was last created or reused (unix time)."""
    stamps = [entry.get("created"), *(u.get("time") for u in entry["users"])]
    times = [datetime.fromisoformat(s).timestamp() for s in stamps if s]
    return max(times, default=entry["path"].stat().st_mtime)


def reusers(entry: dict) -> list[str]:
    """The run dirs that reused the entry (users.jsonl's first line is its creator)."""
    return [u["run_dir"] for u in entry["users"] if u["run_dir"] != entry.get("created_by")]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def list_entries(root: Path, entries: list[dict]) -> None:
    table = Table(title=f"stage cache {root}")
    for column in ("key", "stage", "size", "age", "created by", "reused by"):
        table.add_column(column, justify="right" if column in ("size", "age") else "left")
    now = time.time()
    for e in entries:
        users = reusers(e)
        shown = "\n".join(users[-SHOWN_USERS:]) + (
            f"\n… {len(users) - SHOWN_USERS} more" if len(users) > SHOWN_USERS else "")
        created = e.get("created")
        table.add_row(e.get("key", "damaged"), e.get("stage", "?"), human(e["bytes"]),
                      age(now - datetime.fromisoformat(created).timestamp()) if created else "?",
                      e.get("created_by", "?"), shown or "–")
    Console(width=200).print(table)
    total = sum(e["bytes"] for e in entries)
    print(f"{len(entries)} entries, {human(total)}")


def prune(entries: list[dict], args: argparse.Namespace) -> None:
    now, removed, freed = time.time(), 0, 0
    for e in entries:
        if ((args.stage and e.get("stage") != args.stage)
                or (args.unused and reusers(e))
                or (args.older_than is not None
                    and now - last_used(e) < args.older_than * 86400)):
            continue
        name = e["path"].name
        if args.dry_run:
            print(f"would remove {name} ({human(e['bytes'])})")
        elif not cache.remove(e["path"]):
            print(f"skipped {name}: a running job holds it")
            continue
        else:
            print(f"removed {name} ({human(e['bytes'])})")
        removed, freed = removed + 1, freed + e["bytes"]
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} of {len(entries)} entries, {human(freed)}")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    root = cache.cache_dir(args.dir or default_dir())
    if not root.is_dir():
        print(f"{PROG}: no stage cache at {root}")
        return
    entries = cache.read_entries(root)
    if args.command == "list":
        list_entries(root, entries)
    else:
        prune(entries, args)


if __name__ == "__main__":
    sys.exit(main())
