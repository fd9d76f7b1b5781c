"""`mugs-train [--nproc_per_node N] [torchrun options] [--] FLAGS`: check, then launch the workers.

Everything a user can get wrong (a flag, the data path, the output dir, a resume with other
settings) is checked here, in one process, and reported as the last line on the screen (exit 2)
before any worker starts. Only then does this process become torchrun (torch.distributed.run,
in-process) running `python -m mugs.training.trainer FLAGS` on each rank.

Ownership: before any worker starts, this process takes the output dir's lease (core/lease.py;
with --nnodes > 1 global rank 0's worker takes it instead) and hands its token to the workers:
a second launch into the same --output_dir is refused in one line naming the owner.

Failures: a worker that stops on a user error says so in one line; this process's last line then
names the rank that failed first and why, with that worker's exit code (training/failure.py).

Signals: this process is the one to signal. SIGUSR1, SIGTERM and SIGINT (Ctrl-C) are passed on
to every worker, which checkpoints after its current step and exits 0; then this process exits 0.
(Plain torchrun dies of SIGUSR1, orphaning its workers, and answers SIGTERM/SIGINT by killing the
workers after a timeout; here it handles only SIGHUP/SIGQUIT, which stop the workers at once.)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from ..configs.flags import parse_config
from ..configs.ranges import NON_NEGATIVE, POSITIVE, between, out_of_range
from ..core import lease
from ..core.cli import run_cli
from ..core.errors import ConfigError
from . import failure
from .validate import check_data, check_knn_data, check_output_dir, validate

PROG = "mugs-train"
FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# the launcher options' valid ranges (the training flags state theirs in configs/options.py)
RANGES = {"nproc_per_node": POSITIVE, "nnodes": POSITIVE, "node_rank": NON_NEGATIVE, "master_port": between(1, 65535)}


def _launcher_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        PROG, add_help=False, allow_abbrev=False, usage=f"{PROG} [launcher options] [--] TRAINING FLAGS (listed below)"
    )
    p.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=1, help="workers (GPUs) per node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes; run one mugs-train per node")
    p.add_argument("--node_rank", "--node-rank", type=int, default=0)
    p.add_argument("--master_addr", "--master-addr", default="127.0.0.1")
    p.add_argument("--master_port", "--master-port", type=int, default=None)
    p.add_argument("--rdzv_backend", "--rdzv-backend", default=None)
    p.add_argument("--rdzv_endpoint", "--rdzv-endpoint", default=None)
    p.add_argument("--rdzv_id", "--rdzv-id", default=None)
    p.add_argument(
        "--check_only",
        "--check-only",
        action="store_true",
        help="run the checks and exit (slurm/launch.sh does this before srun)",
    )
    return p


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options first (or anywhere, before an optional `--`), training flags after."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return _launcher_parser().parse_args(argv[:i]), argv[i + 1 :]
    return _launcher_parser().parse_known_args(argv)


def check(flags: list[str], world: int) -> list[str]:
    """All start-up checks in this one process; raises an InputError. Returns the resume notes."""
    from ..core.checkpoint.layout import check_root
    from .resume_guard import check_resume

    cfg = parse_config(flags)  # argparse: usage + one error line, exit 2
    validate(cfg, world)
    check_data(cfg, world)
    check_knn_data(cfg)
    check_output_dir(cfg.output_dir)
    check_root(cfg.output_dir)  # `checkpoints`, `step_N`: directories, or the first save fails
    lease.peek(cfg.output_dir)  # another live run owns it: say so before anything else
    return check_resume(cfg, world)


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (the workers torchrun started)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            kids += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:  # no /proc/*/children: scan every process's parent
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
    return kids


def _forward(signum, _frame) -> None:
    workers = _children(os.getpid())
    name = signal.Signals(signum).name
    if not workers:  # still checking / rendezvous: nothing to save yet
        print(f"{PROG}: {name} before the workers started: exiting", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    print(f"{PROG}: {name}: asking {len(workers)} workers to checkpoint and exit", file=sys.stderr, flush=True)
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _torchrun_argv(opts: argparse.Namespace, flags: list[str]) -> list[str]:
    argv = [f"--nproc_per_node={opts.nproc_per_node}", f"--nnodes={opts.nnodes}", "--max_restarts=0"]
    if opts.rdzv_backend:
        argv += [f"--rdzv_backend={opts.rdzv_backend}", f"--rdzv_endpoint={opts.rdzv_endpoint}"]
        if opts.rdzv_id:
            argv.append(f"--rdzv_id={opts.rdzv_id}")
    else:
        argv += [f"--node_rank={opts.node_rank}", f"--master_addr={opts.master_addr}"]
        if opts.master_port is not None:
            argv.append(f"--master_port={opts.master_port}")
    argv.append("--signals_to_handle=SIGHUP,SIGQUIT")  # USR1/TERM/INT stay ours: _forward
    return argv + ["-m", "mugs.training.trainer", *flags]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: _main(sys.argv[1:] if argv is None else argv), PROG)


def _main(argv: Sequence[str]) -> int:
    before = {sig: signal.signal(sig, _forward) for sig in FORWARDED}  # from the start: a signal during
    try:  # the checks is one line, not a silent death
        return _checked_launch(argv)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _checked_launch(argv: Sequence[str]) -> int:
    opts, flags = split_argv(argv)
    if "-h" in flags or "--help" in flags:
        print(_launcher_parser().format_help())
        parse_config(["--help"])  # the training flags; exits 0
    for name, rng in RANGES.items():
        value = getattr(opts, name)
        if value is not None and out_of_range(name, value, rng):
            raise ConfigError(out_of_range(name, value, rng))
    if opts.node_rank >= opts.nnodes:
        raise ConfigError(f"--node_rank {opts.node_rank} must be below --nnodes {opts.nnodes}")
    world = opts.nproc_per_node * opts.nnodes
    notes = check(flags, world)
    if opts.check_only:
        for note in notes:
            print(f"{PROG}: resume: {note}", file=sys.stderr)
        return 0
    held = None
    if opts.nnodes == 1:  # several nodes: one launcher each, so global rank 0's worker takes the lease
        out = parse_config(flags).output_dir
        try:
            held = lease.acquire(out, log=lambda m: print(m, file=sys.stderr, flush=True))
        except OSError as e:
            raise ConfigError(f"--output_dir {out}: {e}") from None
        os.environ[lease.TOKEN_ENV] = held.token  # the workers adopt it
    try:
        return _launch(opts, flags)
    finally:
        if held is not None:
            held.release()


def _launch(opts: argparse.Namespace, flags: list[str]) -> int:
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    for name in ("torch.distributed.run", "torch.distributed.elastic"):  # the workers say what went wrong
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(_torchrun_argv(opts, flags)))
    except (DistNetworkError, RendezvousError) as e:  # e.g. the rendezvous port is taken
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"the workers' rendezvous failed ({first}): pass a free --master_port (or --rdzv_endpoint HOST:PORT)"
        ) from None
    except ChildFailedError as e:
        _, code, why = failure.blame(e.failures)
        raise failure.WorkerFailed(why, code) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
