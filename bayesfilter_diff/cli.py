"""Command line: ``bayesfilter-diff validate`` (the main job)."""

from __future__ import annotations

import argparse
import sys


def _validate(args: argparse.Namespace) -> int:
    from .studies.ray_executor import RayExecutor, StudyFailedError
    from .studies.validate import validate

    methods = args.methods.split(",") if args.methods else None
    executor = None
    if args.executor == "ray":
        gpus = args.gpus_per_task
        if gpus is None:
            gpus = 1 if args.device.startswith("cuda") else 0
        executor = RayExecutor(
            address=args.address, num_gpus_per_task=gpus, num_workers=args.num_workers
        )
    elif args.address is not None or args.num_workers is not None or args.gpus_per_task is not None:
        raise ValueError("--address, --num-workers and --gpus-per-task need --executor ray")
    try:
        res = validate(
            out=args.out,
            full=args.full,
            methods=methods,
            device=args.device,
            resume=not args.fresh,
            progress=not args.no_progress,
            executor=executor,
            report_only=args.report_only,
        )
    except StudyFailedError as e:
        print(f"bayesfilter-diff: error: {e}", file=sys.stderr)
        return 1
    print(res["text"])
    print(f"report written to {res['report']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from .training import TrainConfig, train

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    net = None
    if args.channels is not None:
        if args.data != "digits":
            raise ValueError("--channels applies to image data (--data digits)")
        chans = [int(c) for c in args.channels.split(",")]
        net = {"type": "unet", "in_channels": 1, "channels": chans, "num_res_blocks": 1}
    kw = {
        k: getattr(args, k)
        for k in ("batch_size", "lr", "ema_decay", "checkpoint_every", "seed", "warmup")
        if getattr(args, k) is not None
    }
    argv = args.argv if args.argv is not None else sys.argv[1:]
    cfg = TrainConfig(
        data=args.data,
        kind=args.kind,
        steps=args.steps,
        parameterization=args.parameterization,
        network=net,
        extra={"command": "bayesfilter-diff " + shlex.join(argv)},
        **kw,
    )
    res = train(
        cfg, args.out, resume=args.resume, device=args.device, progress=not args.no_progress
    )
    last = res["eval_history"][-1][1] if res["eval_history"] else float("nan")
    print(
        f"trained {args.data} {args.kind} to step {res['step']} in {res['wall_time_s']:.0f} s; "
        f"held-out EMA loss {last:.4f}; prior written to {res['prior']}"
    )
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
    v.add_argument(
        "--out", default="validation/demo", help="output folder (report.md, figures, cells)"
    )
    v.add_argument(
        "--resume", action="store_true", default=True, help="reuse completed cells (default)"
    )
    v.add_argument("--fresh", action="store_true", help="discard completed cells and start over")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.add_argument(
        "--report-only",
        action="store_true",
        help="compute nothing: report the cells already in --out (a partial study)",
    )
    v.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="run cells in this process (local) or as Ray tasks (ray)",
    )
    v.add_argument(
        "--address",
        default=None,
        help="Ray cluster address, e.g. auto (default: start a local Ray instance)",
    )
    v.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="Ray tasks in flight (default: the cluster's CPUs; local instance size)",
    )
    v.add_argument(
        "--gpus-per-task",
        type=float,
        default=None,
        help="GPUs per Ray task, may be fractional (default: 1 with --device cuda)",
    )
    v.set_defaults(func=_validate)
    tr = sub.add_parser("train", help="train a small diffusion or flow prior (resumable)")
    tr.add_argument("--data", required=True, choices=["digits", "moons", "checkerboard"])
    tr.add_argument("--kind", required=True, choices=["diffusion", "flow"])
    tr.add_argument("--steps", required=True, type=int, help="total optimiser steps")
    tr.add_argument("--out", required=True, help="output folder (checkpoints, prior.json)")
    tr.add_argument("--resume", action="store_true", help="continue from the folder's checkpoint")
    tr.add_argument(
        "--parameterization",
        default=None,
        choices=["eps", "x0", "v", "velocity"],
        help="network output (default: eps for diffusion, velocity for flow)",
    )
    tr.add_argument("--channels", default=None, help="U-Net channels per resolution, e.g. 32,64")
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--warmup", type=int, default=None)
    tr.add_argument("--ema-decay", type=float, default=None)
    tr.add_argument("--checkpoint-every", type=int, default=None)
    tr.add_argument("--seed", type=int, default=None)
    tr.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    tr.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train, argv=argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"bayesfilter-diff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
