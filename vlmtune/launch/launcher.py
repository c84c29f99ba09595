"""`vlmtune launch RECIPE`: run `vlmtune train` on several processes and nodes, or render the SLURM script for it.

One command, three launchers, the same per-rank program (``python -m vlmtune train RECIPE [overrides]``, which reads
RANK / WORLD_SIZE / LOCAL_RANK from the environment)::

    torchrun   (default)   python -m torch.distributed.run --nnodes M --nproc_per_node N --node_rank R
                            --master_addr A --master_port P -m vlmtune train RECIPE [overrides]
                            run once per node (static rendezvous on A:P, node 0 hosts it)
    deepspeed  (--hostfile) python -m deepspeed.launcher.runner --hostfile FILE ... --no_local_rank
                            --module vlmtune train RECIPE [overrides]      (ssh/pdsh to every host of FILE)
    slurm      (--slurm)   an sbatch script: one task per node, srun starts torchrun on each node with a c10d
                            rendezvous on the first node of the allocation, nproc = launch.slurm.gpus_per_node

Command-line flags override the recipe's ``launch`` section. The recipe is validated for the resulting world size
before anything starts. ``--dry-run`` prints the exact command (environment assignments included) or the whole
script on stdout and runs nothing.

Failure handling: torchrun runs in this process (``torch.distributed.run.run``, exactly what the printed command
runs). When a rank dies, torchrun notices within ``--monitor_interval`` (0.1 s), stops the other ranks, and this
launcher exits 1 with one ``error:`` line naming the rank that failed first, its pid and its signal or exit code.
A rank that hangs instead of dying is ended by the trainer's collective timeout (``launch.collective_timeout_s``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmtune.config import Recipe, RecipeError, load_recipe
from vlmtune.config.schema import Slurm

#: Set for every launch unless the environment already has them. TORCH_NCCL_ASYNC_ERROR_HANDLING makes NCCL abort
#: the communicator of a failed or timed-out collective (an error, not a hang); NCCL_ASYNC_ERROR_HANDLING is its
#: older name (and the DeepSpeed launcher forwards NCCL_* variables to remote hosts).
NCCL_ENV: dict[str, str] = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
}
PYTHON_ENV: dict[str, str] = {"PYTHONUNBUFFERED": "1"}

EXIT_FAILED = 1


class LaunchError(RuntimeError):
    """A launch that cannot start (bad hostfile, missing sbatch, ...), with the fix in the message."""


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a launcher needs: the recipe as given, the overrides, and the resolved launch settings.

    Attributes:
        recipe: the recipe path as given on the command line.
        overrides: ``dotted.key=value`` overrides, passed unchanged to every rank's ``vlmtune train``.
        nproc_per_node: processes per node. nnodes: nodes. node_rank: this node's rank (torchrun only).
        master_addr, master_port: the rendezvous (torchrun static rendezvous; deepspeed; SLURM port).
        hostfile: DeepSpeed hostfile (``host slots=N`` lines) or None.
        slurm: the recipe's launch.slurm section.
    """

    recipe: str
    overrides: tuple[str, ...]
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    hostfile: Path | None
    slurm: Slurm

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


# ----------------------------------------------------------------------------------------------- environment


def env_defaults(device: str, nproc_per_node: int, environ: Mapping[str, str] | None = None,
                 cpu_count: int | None = None) -> dict[str, str]:
    """Environment variables the launch adds: those of the defaults that ``environ`` does not set already.

    Args:
        device: ``cpu`` or ``cuda`` (the ranks' device).
        nproc_per_node: ranks sharing this node's cores.
        environ: the current environment (None = ``os.environ``).
        cpu_count: cores of this node (None = ``os.cpu_count()``).

    Returns:
        ``OMP_NUM_THREADS`` (1 per rank on CPU, where the ranks themselves compete for the cores; cores / ranks on
        GPU nodes, for data loading and CPU offload), the NCCL error-handling defaults and unbuffered Python output.
    """
    environ = os.environ if environ is None else environ
    cores = cpu_count or os.cpu_count() or 1
    threads = 1 if device == "cpu" else max(1, cores // nproc_per_node)
    wanted = {"OMP_NUM_THREADS": str(threads), **NCCL_ENV, **PYTHON_ENV}
    return {k: v for k, v in wanted.items() if k not in environ}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------- torchrun


def train_command(spec: LaunchSpec) -> list[str]:
    """The per-rank program after the interpreter: ``-m vlmtune train RECIPE [overrides]``."""
    return ["-m", "vlmtune", "train", spec.recipe, *spec.overrides]


def torchrun_args(spec: LaunchSpec) -> list[str]:
    """Arguments of ``python -m torch.distributed.run`` for this node (static rendezvous on master_addr:port)."""
    return [
        "--nnodes", str(spec.nnodes), "--nproc_per_node", str(spec.nproc_per_node), "--node_rank",
        str(spec.node_rank), "--master_addr", spec.master_addr, "--master_port", str(spec.master_port),
        *train_command(spec),
    ]


def torchrun_command(spec: LaunchSpec, python: str | None = None) -> list[str]:
    """The full torchrun command line for this node."""
    return [python or sys.executable, "-m", "torch.distributed.run", *torchrun_args(spec)]


def _describe_failure(exc: BaseException, started: float) -> str:
    """One line naming the rank that failed first (ranks torchrun itself stopped with SIGTERM come last)."""
    failures = getattr(exc, "failures", None) or {}
    if not failures:
        return f"the training processes failed after {time.monotonic() - started:.1f} s: {exc}"
    sigterm = -15
    rank, failure = min(failures.items(), key=lambda kv: (kv[1].exitcode == sigterm, kv[1].timestamp, kv[0]))
    signal = failure.signal_name()
    how = f"was killed by signal {signal}" if failure.exitcode < 0 and signal != "<N/A>" else (
        f"exited with code {failure.exitcode}")
    others = sorted(r for r in failures if r != rank)
    stopped = f"; torchrun then stopped rank(s) {', '.join(map(str, others))}" if others else ""
    return (f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {how} "
            f"{time.monotonic() - started:.1f} s after the launch{stopped}. The run is incomplete: fix the cause (its traceback, if any, "
            "is above) and launch again; train.resume=auto continues from the last checkpoint")


def run_torchrun(spec: LaunchSpec, env: Mapping[str, str]) -> int:
    """Run torchrun in this process (the workers inherit ``os.environ`` updated with ``env``). Returns 0 or 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.update(env)
    started = time.monotonic()
    try:
        run(parse_args(torchrun_args(spec)))
    except ChildFailedError as exc:
        print(f"vlmtune launch: error: {_describe_failure(exc, started)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


# --------------------------------------------------------------------------------------------------- deepspeed


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """``(host, slots)`` of each line ``host slots=N`` of a DeepSpeed hostfile (``#`` comments, blank lines ok).

    Raises:
        LaunchError: a missing file or a malformed line, naming the file and the line.
    """
    if not path.is_file():
        raise LaunchError(f"hostfile {path} does not exist; write one line 'host slots=N' per node")
    hosts: list[tuple[str, int]] = []
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or int(parts[1][6:]) < 1:
            raise LaunchError(f"{path}:{i}: expected 'host slots=N' (N >= 1), got {raw.strip()!r}")
        if any(h == parts[0] for h, _ in hosts):
            raise LaunchError(f"{path}:{i}: host {parts[0]} is listed twice")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no host; write one line 'host slots=N' per node")
    return hosts


def hostfile_world(hosts: Sequence[tuple[str, int]], nnodes: int | None, nproc_per_node: int | None) -> tuple[int, int]:
    """(nodes, world size) that DeepSpeed will use: the first ``nnodes`` hosts, at most ``nproc_per_node`` each."""
    used = list(hosts[:nnodes] if nnodes else hosts)
    if nnodes and len(used) < nnodes:
        raise LaunchError(f"--nnodes {nnodes} but the hostfile lists only {len(hosts)} host(s)")
    return len(used), sum(min(slots, nproc_per_node) if nproc_per_node else slots for _, slots in used)


def deepspeed_command(spec: LaunchSpec, nnodes: int | None, nproc_per_node: int | None,
                      python: str | None = None) -> list[str]:
    """The DeepSpeed launcher command: every host of the hostfile runs ``python -m vlmtune train ...``.

    ``--no_local_rank``: vlmtune reads LOCAL_RANK from the environment instead of a ``--local_rank`` argument.
    ``--num_nodes`` / ``--num_gpus`` appear only when given on the command line (else the hostfile decides).
    """
    cmd = [python or sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(spec.hostfile),
           "--master_addr", spec.master_addr, "--master_port", str(spec.master_port)]
    if nnodes:
        cmd += ["--num_nodes", str(nnodes)]
    if nproc_per_node:
        cmd += ["--num_gpus", str(nproc_per_node)]
    return [*cmd, "--no_local_rank", "--module", "vlmtune", "train", spec.recipe, *spec.overrides]


# ------------------------------------------------------------------------------------------------------- slurm


def render_sbatch(spec: LaunchSpec, recipe: Recipe, python: str | None = None, cwd: Path | None = None,
                  command: str | None = None) -> str:
    """The sbatch script: one task per node; srun starts torchrun on every node, c10d rendezvous on the first.

    Args:
        spec: nodes, processes per node (= GPUs per node), port, recipe and overrides.
        recipe: the validated recipe (its name and output folder label the job).
        python: the interpreter the nodes run (None = this one; the nodes must see the same path).
        cwd: the job's working directory (None = the current one): relative override paths resolve against it.
        command: the `vlmtune launch` command line that rendered it (a comment; None = rebuilt from ``spec``).

    Returns:
        The script text, ending with a newline.
    """
    python = python or sys.executable
    cwd = cwd or Path.cwd()
    recipe_path = str(Path(spec.recipe).resolve())
    s = spec.slurm
    name = Path(spec.recipe).stem
    lines = [
        "#!/bin/bash",
        f"# Generated by: {command or 'vlmtune launch ' + shlex.join([spec.recipe, *spec.overrides]) + ' --slurm'}",
        f"# Submit with: sbatch <this file>. {spec.nnodes} node(s) x {spec.nproc_per_node} process(es) = world size "
        f"{spec.world_size}; output in {recipe.train.output_dir}",
        f"#SBATCH --job-name=vlmtune-{name}",
        f"#SBATCH --nodes={spec.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={spec.nproc_per_node}",
    ]
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        lines.append(f"#SBATCH --account={s.account}")
    if s.time:
        lines.append(f"#SBATCH --time={s.time}")
    lines.append(f"#SBATCH --chdir={cwd}")
    lines += [f"#SBATCH {opt if opt.startswith('-') else '--' + opt}" for opt in s.extra_sbatch]
    lines += [
        "",
        "set -euo pipefail",
        "",
        "# One torchrun per node; each starts nproc_per_node ranks. OpenMP threads: the node's cores per rank.",
        f"CPUS_PER_RANK=$(( ${{SLURM_CPUS_ON_NODE:-{spec.nproc_per_node}}} / {spec.nproc_per_node} ))",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_RANK > 0 ? CPUS_PER_RANK : 1 ))}",
        *(f"export {k}=${{{k}:-{v}}}" for k, v in {**NCCL_ENV, **PYTHON_ENV}.items()),
        "",
        "# Rendezvous on the first node of the allocation.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT={spec.master_port}",
        "",
        f"srun --nodes={spec.nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        f"  {shlex.quote(python)} -m torch.distributed.run \\",
        f"    --nnodes {spec.nnodes} --nproc_per_node {spec.nproc_per_node} \\",
        '    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \\',
        f"    -m vlmtune train {shlex.join([recipe_path, *spec.overrides])}",
    ]
    return "\n".join(lines) + "\n"


def submit_sbatch(script: str, out_dir: Path) -> int:
    """Write the script to ``<out_dir>/launch/sbatch.sh`` and submit it with ``sbatch``. Returns sbatch's status."""
    import shutil

    path = out_dir / "launch" / "sbatch.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if shutil.which("sbatch") is None:
        raise LaunchError(f"sbatch is not on PATH (not a SLURM login node?); the script is in {path}: copy it to the "
                          "cluster and run `sbatch` there, or use --dry-run to print it")
    print(f"vlmtune launch: submitting {path}", file=sys.stderr)
    return subprocess.call(["sbatch", str(path)])


# --------------------------------------------------------------------------------------------------------- CLI


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is in [1, 65535], got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmtune launch",
        description="Run `vlmtune train RECIPE` on several processes/nodes (torchrun, DeepSpeed hostfile) or render a "
        "SLURM script. Flags override the recipe's launch section; key=value overrides may come anywhere and are "
        "passed to every rank.")
    p.add_argument("recipe", help="the YAML recipe")
    p.add_argument("--nproc-per-node", type=_positive, help="processes (GPUs) per node (launch.nproc_per_node)")
    p.add_argument("--nnodes", type=_positive, help="nodes (launch.nnodes)")
    p.add_argument("--node-rank", type=_non_negative, help="this node's rank, torchrun only (launch.node_rank)")
    p.add_argument("--master-addr", help="rendezvous host, the node of rank 0 (launch.master_addr)")
    p.add_argument("--master-port", type=_port, help="rendezvous port (launch.master_port)")
    p.add_argument("--hostfile", type=Path, help="DeepSpeed hostfile: launch with the DeepSpeed launcher (ssh/pdsh)")
    p.add_argument("--slurm", action="store_true", help="render an sbatch script (submitted unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print the exact command (or the script) and run nothing")
    return p


def resolve_spec(args: argparse.Namespace, overrides: Sequence[str]) -> tuple[LaunchSpec, Recipe]:
    """Merge the flags over the recipe's launch section and validate the recipe for the resulting world size."""
    base = load_recipe(args.recipe, overrides, world_size=1)  # the launch section (batch arithmetic checked below)
    ln = base.launch
    nproc = args.nproc_per_node or (ln.slurm.gpus_per_node if args.slurm and ln.slurm.gpus_per_node else
                                    ln.nproc_per_node)
    nnodes = args.nnodes or ln.nnodes
    node_rank = ln.node_rank if args.node_rank is None else args.node_rank
    if node_rank >= nnodes:
        raise LaunchError(f"--node-rank {node_rank} must be < the number of nodes ({nnodes})")
    hostfile = args.hostfile or ln.hostfile
    if args.slurm and hostfile is not None and args.hostfile is not None:
        raise LaunchError("--slurm and --hostfile are two different launchers; give one of them")
    spec = LaunchSpec(recipe=args.recipe, overrides=tuple(overrides), nproc_per_node=nproc, nnodes=nnodes,
                      node_rank=node_rank, master_addr=args.master_addr or ln.master_addr,
                      master_port=args.master_port or ln.master_port,
                      hostfile=None if args.slurm else hostfile, slurm=ln.slurm)
    world = spec.world_size
    if spec.hostfile is not None:
        hosts = read_hostfile(spec.hostfile)
        _, world = hostfile_world(hosts, args.nnodes, args.nproc_per_node)
    return spec, load_recipe(args.recipe, overrides, world_size=world)


def _env_prefix(env: Mapping[str, str]) -> str:
    return "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())


def main(argv: list[str]) -> int:
    """``vlmtune launch RECIPE [--nproc-per-node N] [--nnodes M --node-rank R --master-addr A --master-port P]
    [--hostfile FILE] [--slurm] [--dry-run] [key=value ...]``.

    Returns:
        0 on success; 1 when a rank failed (one ``error:`` line names it) or the launch cannot start. Recipe errors
        raise :class:`~vlmtune.config.RecipeError` (the CLI prints them and exits 2).
    """
    from vlmtune.cli import parse_with_overrides

    args, overrides = parse_with_overrides(build_parser(), argv)
    try:
        spec, recipe = resolve_spec(args, overrides)
        if args.slurm:
            script = render_sbatch(spec, recipe, command="vlmtune launch " + shlex.join(argv))
            if args.dry_run:
                sys.stdout.write(script)
                return 0
            return submit_sbatch(script, Path(recipe.train.output_dir))
        device = _device()
        env = env_defaults(device, spec.nproc_per_node)
        if spec.hostfile is not None:
            cmd = deepspeed_command(spec, args.nnodes, args.nproc_per_node)
            if args.dry_run:
                print(_env_prefix(env) + shlex.join(cmd))
                return 0
            rc = subprocess.call(cmd, env={**os.environ, **env})
            if rc != 0:
                print(f"vlmtune launch: error: the DeepSpeed launcher exited with code {rc}; the failing rank's output "
                      "is above", file=sys.stderr)
                return EXIT_FAILED
            return 0
        if args.dry_run:
            print(_env_prefix(env) + shlex.join(torchrun_command(spec)))
            return 0
        print(f"vlmtune launch: node {spec.node_rank} of {spec.nnodes}, {spec.nproc_per_node} rank(s) here, world size "
              f"{spec.world_size}, rendezvous {spec.master_addr}:{spec.master_port}, {device}", file=sys.stderr)
        return run_torchrun(spec, env)
    except LaunchError as exc:
        print(f"vlmtune launch: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _module_main() -> int:
    """``python -m vlmtune.launch.launcher ...``: :func:`main` with recipe errors printed like the CLI does."""
    try:
        return main(sys.argv[1:])
    except RecipeError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_module_main())
