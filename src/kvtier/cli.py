"""The ``kvtier`` command: ``kvtier bench`` (replay a workload through the real stack), the
operator commands ``kvtier inspect|fsck|gc|du`` (see :mod:`kvtier.ops`) and ``kvtier version``.
This module parses and dispatches; the work happens in ``kvtier.bench`` and ``kvtier.ops``."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from kvtier.bench.configure import DEFAULT_CPU_FRACTION, DEFAULT_TIER_FRACTION
from kvtier.ops import COMMANDS as OPS_COMMANDS
from kvtier.ops import add_parsers as add_ops_parsers


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fractions(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions like 0.01,0.1,0.5, got {text!r}"
        ) from None
    if not vals or any(not 0 < v <= 10 for v in vals):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 10], got {text!r}")
    return vals


def _write_policies(text: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals or any(v not in ("through", "back") for v in vals):
        raise argparse.ArgumentTypeError(
            f"expected write policies from through,back (comma-separated), got {text!r}")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _fraction(text: str) -> float:
    return _fractions(text)[0]


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kvtier``."""
    p = _Parser(prog="kvtier", description="kvtier: multi-tier KV cache offloading")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("version", help="print the version")
    b = sub.add_parser(
        "bench",
        help="replay a workload through an engine simulator, kvtier and its baselines",
        description=(
            "Replay a workload (the built-in synthetic one, or a Mooncake JSONL trace) through an "
            "engine simulator that uses kvtier as an engine does, beside the no-offload and "
            "CPU-only baselines and the reference LRU model, and report hit rates, prefill "
            "tokens saved, bytes per tier and scheduler cost."
        ),
    )
    w = b.add_argument_group("workload")
    w.add_argument("--trace", metavar="FILE", help="Mooncake JSONL trace (default: synthetic)")
    w.add_argument("--limit", type=_positive, metavar="N", help="replay only the first N requests")
    w.add_argument("--block-tokens", type=_positive, default=512, metavar="N",
                   help="tokens per offloaded block, as the trace's hash_ids use (default 512)")
    w.add_argument("--seed", type=int, default=0, help="synthetic workload seed (default 0)")
    w.add_argument("--sessions", type=_positive, default=None,
                   help="synthetic workload: number of chat sessions (default 400)")
    w.add_argument("--session-rate", type=float, default=None, metavar="PER_S",
                   help="synthetic workload: new sessions per second (default 4)")
    c = b.add_argument_group("tiers")
    c.add_argument("--config", metavar="JSON|@FILE",
                   help="kvtier extra_config (inline JSON or @file); default: CPU + a storage "
                        "tier in a temporary directory")
    c.add_argument("--cpu-blocks", type=_positive, metavar="N", help="CPU tier size in blocks")
    c.add_argument("--cpu-fraction", type=_fraction, metavar="F",
                   help=f"CPU tier size as a share of the distinct blocks "
                        f"(default {DEFAULT_CPU_FRACTION} unless the config sets cpu_bytes_to_use)")
    c.add_argument("--tier-blocks", type=_positive, metavar="N",
                   help="capacity of each bounded secondary tier, in blocks")
    c.add_argument("--tier-fraction", type=_fraction, metavar="F",
                   help="secondary tier capacity as a share of the distinct blocks "
                        f"(embedded default {DEFAULT_TIER_FRACTION})")
    c.add_argument("--sweep", nargs="?", const="0.01,0.05,0.1,0.25,0.5", type=_fractions,
                   metavar="F,F,...", help="also replay at these CPU capacities (shares of the "
                   "distinct blocks; default 0.01,0.05,0.1,0.25,0.5)")
    c.add_argument("--sweep-tier", type=_fractions, metavar="F,F,...",
                   help="with --sweep: also vary the secondary tier capacity (shares)")
    c.add_argument("--sweep-write-policy", type=_write_policies, metavar="P,P",
                   help="with --sweep: replay the tiers with each write policy (through, back)")
    c.add_argument("--vllm", action="store_true",
                   help="also replay through vLLM 0.33's own TieringOffloadingManager (CPU + fs)")
    c.add_argument("--no-baselines", action="store_true",
                   help="skip the no-offload and CPU-only replays")
    c.add_argument("--no-reference", action="store_true", help="skip the reference LRU model")
    f = b.add_argument_group("several engines")
    f.add_argument("--engines", type=_positive, default=1, metavar="N",
                   help="also split the requests round-robin across N engines, each with 1/N "
                        "of the CPU tier, whose storage tiers share one directory (and, to "
                        "compare, each with its own directory and 1/N of the capacity); "
                        "reported against the one engine with all the CPU memory (default 1)")
    f.add_argument("--sync-seconds", type=_positive_float, default=1.0, metavar="S",
                   help="with --engines: how often, in simulated seconds, each engine's storage "
                        "tier reads what the others stored (the tier's sync_seconds; default 1)")
    e = b.add_argument_group("engine")
    e.add_argument("--no-prefix-cache", action="store_true",
                   help="switch the engine's own prefix cache off")
    e.add_argument("--full-blocks-only", action="store_true",
                   help="look up and store full blocks only (a request's partial last block is "
                        "always recomputed, as an engine does)")
    e.add_argument("--gpu-blocks", type=_positive, metavar="N",
                   help="engine KV pool size in offloaded blocks (default: twice the largest "
                        "request)")
    e.add_argument("--gpu-block-tokens", type=_positive, default=16, metavar="N",
                   help="tokens per engine KV block (default 16)")
    e.add_argument("--bytes-per-block", type=_positive, default=4096, metavar="N",
                   help="KV bytes per offloaded block, all layers (default 4096: keeps runs fast)")
    e.add_argument("--concurrency", type=_positive, default=1, metavar="N",
                   help="requests in flight at once (default 1: a request's blocks are stored "
                        "before the next request looks up, as the reference replay assumes)")
    e.add_argument("--device", default="auto", help="engine KV device: auto, cpu, cuda")
    o = b.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    o.add_argument("--plot", metavar="FILE.png", help="write a PNG: hit rate vs capacity, bytes per tier")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ops_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvtier`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        from kvtier import __version__

        print(f"kvtier {__version__}")
        return 0
    if args.command == "bench":
        return bench(args)
    if args.command in OPS_COMMANDS:
        from kvtier.ops import run

        return run(args.command, args)
    parser.print_help()
    return 2


def _err(msg: str) -> int:
    print(f"kvtier bench: error: {msg}", file=sys.stderr)
    return 2


def bench(args: argparse.Namespace) -> int:
    """``kvtier bench``."""
    from rich.console import Console

    from kvtier.bench.configure import SizeFlags
    from kvtier.bench.configure import build as build_bench_config
    from kvtier.bench.engine import BenchError, EngineOptions
    from kvtier.bench.report import plot, render, write_json
    from kvtier.bench.runner import Plan
    from kvtier.bench.workload import SyntheticParams, TraceError, load_trace, synthetic_workload
    from kvtier.config import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _err("--plot needs matplotlib, which is not installed: "
                        "pip install 'kvtier[plot]' (or 'kvtier[all]')")
    if args.vllm:
        from kvtier.bench.vllm_backend import vllm_unavailable

        why = vllm_unavailable()
        if why:
            return _err(f"--vllm: vLLM's TieringOffloadingManager cannot be used here: {why}")
    try:
        if args.trace:
            wl = load_trace(args.trace, block_tokens=args.block_tokens, limit=args.limit)
        else:
            sp = SyntheticParams(seed=args.seed, block_tokens=args.block_tokens)
            kw: dict[str, Any] = {}
            if args.sessions is not None:
                kw["sessions"] = args.sessions
            if args.session_rate is not None:
                kw["session_rate"] = args.session_rate
            if kw:
                sp = SyntheticParams(**{**sp.__dict__, **kw})
            wl = synthetic_workload(sp)
            if args.limit:
                wl = wl.head(args.limit)
    except TraceError as e:
        return _err(str(e))
    except ValueError as e:
        return _err(str(e))

    opts = EngineOptions(
        block_tokens=args.block_tokens,
        gpu_block_tokens=args.gpu_block_tokens,
        bytes_per_block=args.bytes_per_block,
        prefix_cache=not args.no_prefix_cache,
        gpu_blocks=args.gpu_blocks,
        full_blocks_only=args.full_blocks_only,
        concurrency=args.concurrency,
        device=args.device,
    )
    try:
        opts.validate()
    except ValueError as e:
        return _err(str(e))

    try:
        bc = build_bench_config(args.config, opts, wl.distinct_blocks, SizeFlags(
            cpu_blocks=args.cpu_blocks, cpu_fraction=args.cpu_fraction,
            tier_blocks=args.tier_blocks, tier_fraction=args.tier_fraction,
            sweep=bool(args.sweep)))
    except (ConfigError, ValueError) as e:
        return _err(str(e))
    if args.config:
        console.print("kvtier bench: " + ("; ".join(bc.notes) if bc.notes else
                                          "--config replayed as given (no flag overrides a "
                                          "value)"), markup=False, soft_wrap=True)
    try:
        plan = Plan(
            engine=opts,
            config=bc.config,
            cpu_blocks=bc.cpu_blocks,
            tier_blocks=bc.tier_blocks,
            baselines=not args.no_baselines,
            vllm=args.vllm,
            reference=not args.no_reference,
            sweep_cpu=args.sweep or [],
            sweep_tier=args.sweep_tier or [],
            sweep_write=args.sweep_write_policy or [],
            engines=args.engines,
            sync_seconds=args.sync_seconds,
        )
        if args.engines > 1 and not any(
            t.get("type") in ("storage", "fs") for t in bc.config.get("secondary_tiers") or []
        ):
            return _err("--engines needs a storage tier in the configuration (the engines share "
                        "its directory)")
        report = _run(wl, plan, console, quiet=args.quiet)
    except (ConfigError, BenchError, ValueError) as e:
        return _err(str(e))
    finally:
        if bc.tmpdir is not None:
            shutil.rmtree(bc.tmpdir, ignore_errors=True)

    render(report, console)
    try:
        if args.json:
            write_json(report, args.json)
            console.print(f"JSON report: {args.json}")
        if args.plot:
            plot(report, args.plot)
            console.print(f"plot: {args.plot}")
    except OSError as e:
        return _err(f"cannot write {e.filename or 'the output'}: {e.strerror or e}")
    wrong = sum(r.get("wrong_blocks", 0) for r in report["runs"])
    wrong += sum(p.get("wrong_blocks", 0) for p in report.get("sweep") or [])
    if wrong:
        console.print(f"[red]{wrong} loaded blocks had wrong bytes[/red]")
        return 1
    return 0


def _run(wl: Any, plan: Any, console: Any, *, quiet: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvtier.bench.runner import BenchRunner

    if quiet:
        return BenchRunner(wl, plan).run()
    with Progress(
        TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:

        def factory(name: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(name, total=total)

            def update(done: int) -> None:
                progress.update(task, completed=done)

            return update

        return BenchRunner(wl, plan, progress=factory).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
