"""Command line: ``bayesfilter-diff validate`` (the main job)."""

from __future__ import annotations

import argparse
import sys


def _validate(args: argparse.Namespace) -> int:
    from .studies.validate import validate

    methods = args.methods.split(",") if args.methods else None
    res = validate(
        out=args.out,
        full=args.full,
        methods=methods,
        device=args.device,
        resume=not args.fresh,
        progress=not args.no_progress,
    )
    print(res["text"])
    print(f"report written to {res['report']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bayesfilter-diff",
        description="Posterior sampling with diffusion priors, validated against exact posteriors.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="run every sampler on the Gaussian-mixture benchmark")
    v.add_argument("--full", action="store_true", help="the published protocol (hours on CPU)")
    v.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    v.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    v.add_argument("--out", default="validation/demo", help="output folder (report.md, figures, cells)")
    v.add_argument("--resume", action="store_true", default=True, help="reuse completed cells (default)")
    v.add_argument("--fresh", action="store_true", help="discard completed cells and start over")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_validate)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"bayesfilter-diff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
