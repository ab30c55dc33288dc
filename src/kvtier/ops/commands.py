"""``kvtier inspect|fsck|gc|du``: resolve the target, run the command, print the result, and turn
every expected failure into one line on standard error and an exit status.

Exit status: 0 when nothing is wrong; 1 when ``fsck`` found bad records or stray files (also
after repairing them) or ``gc`` skipped part of its work (a namespace in use); 2 on bad input: a
bad flag or TARGET, an unreadable path, a server that cannot be reached or refuses the password.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kvtier.ops.common import GcPlan, Options
from kvtier.ops.progress import Progress
from kvtier.ops.target import Selection, redact, resolve_target
from kvtier.ops.units import UsageError, parse_count, parse_duration, parse_size

COMMANDS = ("inspect", "fsck", "gc", "du")


def _backend(target: Any, opts: Options) -> Any:
    if target.kind == "redis":
        from kvtier.ops.network import RedisOps

        return RedisOps(target.url, opts)
    if target.kind == "shm":
        from kvtier.ops.shm import ShmOps

        return ShmOps(target.path, opts)
    from kvtier.ops.storage import StorageOps

    return StorageOps(target.path, target.lane, opts)


def _plan(args: argparse.Namespace) -> GcPlan:
    plan = GcPlan(drop=args.drop, stale=args.stale, dry_run=args.dry_run)
    if args.older_than is not None:
        plan.older_than_s = parse_duration(args.older_than, "--older-than")
    if args.older_than_writes is not None:
        plan.older_than_writes = parse_count(args.older_than_writes, "--older-than-writes")
    if args.shrink_to is not None:
        plan.shrink_to = parse_size(args.shrink_to, "--shrink-to")
    if not plan.describe():
        raise UsageError("nothing to do: give --drop, --older-than, --older-than-writes, "
                         "--shrink-to or --stale (with --dry-run to see what would go)")
    if plan.drop and not args.namespace:
        raise UsageError("--drop needs --namespace (the namespaces to drop)")
    return plan


def _options(args: argparse.Namespace) -> Options:
    threads = getattr(args, "threads", None)
    if threads is not None and not 1 <= threads <= 256:
        raise UsageError(f"--threads: expected 1 to 256, got {threads}")
    if args.timeout <= 0:
        raise UsageError(f"--timeout: expected a positive number of seconds, got {args.timeout}")
    opts = Options(
        selection=Selection(list(args.namespace or [])),
        progress=Progress(not args.json and not args.quiet),
        shm_prefix=args.shm_prefix,
        timeout=args.timeout,
        password=os.environ.get("REDISCLI_AUTH") or None,
    )
    if threads is not None:
        opts.threads = threads
    return opts


def _exit_code(command: str, result: dict[str, Any]) -> int:
    if command == "fsck":
        return 1 if result["records_bad"] or result["stray"] or result["skipped"] else 0
    if command == "gc":
        return 1 if result["skipped"] else 0
    return 0


def run(command: str, args: argparse.Namespace) -> int:
    """Run one operator command from parsed arguments; returns the exit status."""
    import redis

    prog = f"kvtier {command}"
    target_text = redact(args.target) if "://" in args.target else args.target
    try:
        opts = _options(args)
        plan = _plan(args) if command == "gc" else None
        target = resolve_target(args.target)
        ops = _backend(target, opts)
        try:
            if command == "inspect":
                result = ops.inspect()
            elif command == "du":
                result = ops.du()
            elif command == "fsck":
                result = ops.fsck(args.repair)
            else:
                assert plan is not None
                result = ops.gc(plan)
        finally:
            ops.close()
    except UsageError as e:
        return _fail(prog, str(e))
    except redis.AuthenticationError as e:
        return _fail(prog, f"{target_text}: authentication failed ({_first_line(e)}); give the "
                           "password in the URL (redis://:PASSWORD@host:port) or REDISCLI_AUTH")
    except (redis.ConnectionError, redis.TimeoutError) as e:
        return _fail(prog, f"{target_text}: cannot reach the server: {_first_line(e)}")
    except redis.ResponseError as e:
        text = _first_line(e)
        if text.startswith("NOAUTH"):
            text += " (give the password in the URL or REDISCLI_AUTH)"
        return _fail(prog, f"{target_text}: the server refused a command: {text}")
    except redis.RedisError as e:
        return _fail(prog, f"{target_text}: {type(e).__name__}: {_first_line(e)}")
    except OSError as e:
        where = e.filename or target_text
        return _fail(prog, f"{where}: {e.strerror or e}")
    except ValueError as e:
        return _fail(prog, str(e))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, sort_keys=False))
    else:
        from kvtier.ops.render import render

        render(command, result)
    return _exit_code(command, result)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _fail(prog: str, msg: str) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return 2


def add_parsers(sub: Any) -> None:
    """Add the four commands to the ``kvtier`` command's subparsers."""
    helps = {
        "inspect": "namespaces, blocks, bytes, ages, attached engines and stale pieces of a tier",
        "fsck": "verify every record of a tier (header, namespace, key, length, checksums)",
        "gc": "drop namespaces, old blocks, blocks beyond a size, stale pieces",
        "du": "bytes and blocks per namespace",
    }
    for name in COMMANDS:
        p = sub.add_parser(name, help=helps[name], description=helps[name] + ". TARGET is a "
                           "storage tier's path (or one of its namespace directories), a "
                           "redis:// or rediss:// URL (a cluster: any node), or /dev/shm.")
        p.add_argument("target", metavar="TARGET")
        p.add_argument("--json", action="store_true", help="print one JSON object (see README)")
        p.add_argument("--namespace", action="append", metavar="NS",
                       help="only this namespace: a directory name, a fingerprint (or its first "
                            "6+ hex digits) or the namespace string engines use; repeatable")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                       help="Redis connect and socket timeout in seconds (default 5)")
        p.add_argument("--shm-prefix", default="kvtier-", metavar="PREFIX",
                       help="shared-memory regions considered: names starting with this "
                            "(default kvtier-)")
        if name == "fsck":
            p.add_argument("--repair", action="store_true",
                           help="erase bad records and remove stray files (never a record an "
                                "engine is writing)")
            p.add_argument("--threads", type=int, default=None, metavar="N",
                           help="reader threads for a storage tier (default 16)")
        if name == "gc":
            p.add_argument("--drop", action="store_true",
                           help="remove the namespaces --namespace names, entirely")
            p.add_argument("--older-than", metavar="DURATION",
                           help="Redis: remove blocks not accessed for this long (90s, 15m, 2h, 7d)")
            p.add_argument("--older-than-writes", metavar="N",
                           help="storage: remove blocks written (or last reused) more than N "
                                "writes ago in their namespace (50000, 50k)")
            p.add_argument("--shrink-to", metavar="SIZE",
                           help="keep each namespace within SIZE (10G, 512MiB), removing its "
                                "oldest blocks; storage files are compacted and cut")
            p.add_argument("--stale", action="store_true",
                           help="remove stale pieces: idle and empty namespace lanes, stray "
                                "files, /dev/shm regions of dead engines")
            p.add_argument("--dry-run", action="store_true",
                           help="say what would go, remove nothing")
