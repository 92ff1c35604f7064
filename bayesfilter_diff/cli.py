"""Command line: ``bayesfilter-diff validate`` (the main job)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _check_device(device: str, local: bool = True) -> None:
    """A one-line error for a device torch does not know or (``local``: the work runs
    here, not on a Ray cluster) this machine does not have."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda): {e}") from e
    if local and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this machine has no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: use cpu, cuda or mps")


def _check_out(out: str) -> None:
    """A one-line error for an output folder that is a file or cannot be created."""
    from pathlib import Path

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {out!r} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out!r} cannot be created: {e.strerror or e}") from e


def _methods(text: str | None) -> list[str] | None:
    if text is None:
        return None
    methods = [m.strip() for m in text.split(",")]
    if not any(methods):
        raise ValueError("--methods is empty: give comma-separated method names (see --help)")
    if not all(methods):
        raise ValueError(f"--methods {text!r} has an empty name")
    return methods


def _validate(args: argparse.Namespace) -> int:
    from .studies.ray_executor import RayExecutor, StudyFailedError
    from .studies.validate import validate

    methods = _methods(args.methods)
    _check_device(args.device, local=args.executor == "local")
    _check_out(args.out)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.num_workers is not None and args.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {args.num_workers}")
    executor: Any
    if args.executor == "ray":
        gpus = args.gpus_per_task
        if gpus is None:
            gpus = 1 if args.device.startswith("cuda") else 0
        executor = RayExecutor(
            address=args.address, num_gpus_per_task=gpus, num_workers=args.num_workers
        )
    elif args.address is not None or args.gpus_per_task is not None:
        raise ValueError("--address and --gpus-per-task need --executor ray")
    else:
        from .studies.grid import ProcessExecutor

        workers = args.num_workers
        if workers is None and not args.device.startswith("cpu"):
            workers = 1  # one process per accelerator
        executor = ProcessExecutor(workers, threads=args.threads)
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
    from pathlib import Path

    import torch

    from .training import TrainConfig, train

    _check_device(args.device)
    if args.resume and not (Path(args.out) / "checkpoint.json").exists():
        raise ValueError(
            f"--resume: {args.out!r} holds no checkpoint to continue; drop --resume to start a "
            "new run there"
        )
    _check_out(args.out)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
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
    from . import __version__
    from .samplers.registry import names

    parser = argparse.ArgumentParser(
        prog="bayesfilter-diff",
        description="Posterior sampling with diffusion priors, validated against exact posteriors.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="run every sampler on the Gaussian-mixture benchmark")
    v.add_argument("--full", action="store_true", help="the published protocol (hours on CPU)")
    v.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names (default: all of the benchmark's): "
        + ", ".join(names(studies=True, mask=False)),
    )
    v.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    v.add_argument(
        "--out",
        default="validation/demo",
        help="output folder: report.md, figures, cells (default: validation/demo)",
    )
    v.add_argument(
        "--resume",
        action="store_true",
        default=True,
        help="reuse completed cells: always on, the study resumes unless --fresh",
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
        help="run cells in worker processes on this machine (local) or as Ray tasks (ray)",
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
        help="local: worker processes (default: one per core, one with a GPU); ray: tasks in "
        "flight (default: the cluster's CPUs; local instance size)",
    )
    v.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker process (default 1: many small cells run fastest as "
        "one single-threaded process per core)",
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
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue from the folder's checkpoint (an error if it has none)",
    )
    tr.add_argument(
        "--parameterization",
        default=None,
        choices=["eps", "x0", "v", "velocity"],
        help="network output (default: eps for diffusion, velocity for flow)",
    )
    tr.add_argument("--channels", default=None, help="U-Net channels per resolution, e.g. 32,64")
    tr.add_argument(
        "--batch-size", type=int, default=None, help="examples per step (default: TrainConfig's)"
    )
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (Adam)")
    tr.add_argument("--warmup", type=int, default=None, help="linear learning-rate warm-up steps")
    tr.add_argument(
        "--ema-decay", type=float, default=None, help="decay of the weights' moving average"
    )
    tr.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    tr.add_argument("--seed", type=int, default=None, help="seed of the run's generators")
    tr.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    tr.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train, argv=argv)
    args = parser.parse_args(argv)
    from ._alloc import tune_allocator

    tune_allocator()  # freed tensors stay in the process: no page faults per step
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"bayesfilter-diff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
