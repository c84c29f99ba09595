"""`vlmtune launch`: the exact commands and scripts it runs (torchrun, DeepSpeed hostfile, SLURM), flag precedence over
the recipe's launch section, and its errors. Nothing here starts a training process (tests/launch/test_multiproc.py
does, including the killed-rank case)."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlmtune.config import RecipeError
from vlmtune.launch import launcher
from vlmtune.launch.launcher import LaunchError, env_defaults, hostfile_world, read_hostfile

REPO = Path(__file__).resolve().parents[2]
ENV_KEYS = ("OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING", "NCCL_DEBUG",
            "PYTHONUNBUFFERED")
CPU_ENV = ("OMP_NUM_THREADS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=WARN "
           "PYTHONUNBUFFERED=1 ")


@pytest.fixture(autouse=True)
def _no_launch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults the launcher adds depend on what the environment already sets: start from none of them, on CPU."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(launcher, "_device", lambda: "cpu")


def _recipe(tmp_path: Path, **launch: object) -> Path:
    data = {
        "model": {"path": "model"},
        "data": {"train": [{"path": "data/train.jsonl"}]},
        "train": {"output_dir": "out", "max_steps": 4, "global_batch_size": 32},
    }
    if launch:
        data["launch"] = launch
    path = tmp_path / "r.yaml"
    path.write_text("# Run: vlmtune launch r.yaml\n" + yaml.safe_dump(data))
    return path


def _dry_run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert launcher.main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_torchrun_dry_run_is_the_exact_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(_recipe(tmp_path))
    # options and overrides in any order
    out = _dry_run([recipe, "train.max_steps=8", "--nproc-per-node", "2", "train.output_dir=runs/x"], capsys)
    assert out == (CPU_ENV + f"{sys.executable} -m torch.distributed.run --nnodes 1 --nproc_per_node 2 --node_rank 0 "
                   f"--master_addr 127.0.0.1 --master_port 29500 -m vlmtune train {recipe} train.max_steps=8 "
                   "train.output_dir=runs/x\n")
    # what is printed is what runs: the same arguments parse into torchrun's configuration
    from torch.distributed.run import parse_args

    words = shlex.split(out)
    assert words[5:8] == [sys.executable, "-m", "torch.distributed.run"]
    args = parse_args(words[8:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.master_port) == ("1", "2", 0, 29500)
    assert (args.module, args.training_script) == (True, "vlmtune")
    assert args.training_script_args == ["train", recipe, "train.max_steps=8", "train.output_dir=runs/x"]


def test_flags_override_the_launch_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(_recipe(tmp_path, nproc_per_node=4, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                         master_port=1234))
    from_recipe = _dry_run([recipe], capsys)
    assert ("--nnodes 2 --nproc_per_node 4 --node_rank 1 --master_addr 10.0.0.1 --master_port 1234 -m vlmtune "
            f"train {recipe}\n") in from_recipe
    flags = _dry_run([recipe, "--nproc-per-node", "8", "--nnodes", "4", "--node-rank", "3", "--master-addr",
                      "node0", "--master-port", "2345"], capsys)
    assert f"--nnodes 4 --nproc_per_node 8 --node_rank 3 --master_addr node0 --master_port 2345 -m vlmtune train {recipe}\n" in flags


def test_environment_defaults() -> None:
    assert env_defaults("cpu", 4, environ={}) == {
        "OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_ASYNC_ERROR_HANDLING": "1",
        "NCCL_DEBUG": "WARN", "PYTHONUNBUFFERED": "1"}
    assert env_defaults("cuda", 8, environ={}, cpu_count=96)["OMP_NUM_THREADS"] == "12"
    assert env_defaults("cuda", 8, environ={}, cpu_count=4)["OMP_NUM_THREADS"] == "1"
    # the user's environment wins: nothing it sets is added
    assert env_defaults("cpu", 2, environ={"OMP_NUM_THREADS": "3", "NCCL_DEBUG": "INFO"}) == {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_ASYNC_ERROR_HANDLING": "1", "PYTHONUNBUFFERED": "1"}


def test_world_size_is_checked_before_launching(tmp_path: Path) -> None:
    recipe = str(_recipe(tmp_path))
    with pytest.raises(RecipeError, match=r"global_batch_size=32 is not divisible .* world size \(3\)"):
        launcher.main([recipe, "--nproc-per-node", "3", "--dry-run"])
    with pytest.raises(RecipeError, match=r"world size \(6\)"):
        launcher.main([recipe, "--nproc-per-node", "3", "--nnodes", "2", "--dry-run"])


def test_node_rank_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert launcher.main([str(_recipe(tmp_path)), "--nnodes", "2", "--node-rank", "2", "--dry-run"]) == 1
    assert "vlmtune launch: error: --node-rank 2 must be < the number of nodes (2)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- hostfile


def test_hostfile_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = str(_recipe(tmp_path))
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8  # second\n")
    out = _dry_run([recipe, "--hostfile", str(hosts), "train.max_steps=2"], capsys)
    assert out == (CPU_ENV + f"{sys.executable} -m deepspeed.launcher.runner --hostfile {hosts} --master_addr "
                   f"127.0.0.1 --master_port 29500 --no_local_rank --module vlmtune train {recipe} train.max_steps=2\n")
    limited = _dry_run([recipe, "--hostfile", str(hosts), "--nnodes", "1", "--nproc-per-node", "4"], capsys)
    assert "--master_port 29500 --num_nodes 1 --num_gpus 4 --no_local_rank --module vlmtune train" in limited
    # the world size comes from the hostfile: 2 x 8 = 16 ranks divide 32 packs, 2 x 3 = 6 do not
    hosts.write_text("node-a slots=3\nnode-b slots=3\n")
    with pytest.raises(RecipeError, match=r"world size \(6\)"):
        launcher.main([recipe, "--hostfile", str(hosts), "--dry-run"])


def test_hostfile_parsing_errors(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    with pytest.raises(LaunchError, match="does not exist"):
        read_hostfile(tmp_path / "absent")
    path.write_text("node-a slots=8\nnode-b 8\n")
    with pytest.raises(LaunchError, match=r"hosts:2: expected 'host slots=N'"):
        read_hostfile(path)
    path.write_text("node-a slots=8\nnode-a slots=8\n")
    with pytest.raises(LaunchError, match="listed twice"):
        read_hostfile(path)
    path.write_text("node-a slots=8\nnode-b slots=4\n")
    assert read_hostfile(path) == [("node-a", 8), ("node-b", 4)]
    assert hostfile_world(read_hostfile(path), None, None) == (2, 12)
    assert hostfile_world(read_hostfile(path), 1, None) == (1, 8)
    assert hostfile_world(read_hostfile(path), None, 2) == (2, 4)
    with pytest.raises(LaunchError, match="lists only 2 host"):
        hostfile_world(read_hostfile(path), 3, None)


# ------------------------------------------------------------------------------------------------------ SLURM


def _slurm_script(capsys: pytest.CaptureFixture[str], *overrides: str) -> str:
    recipe = REPO / "recipes" / "kimi_vl_a3b_4node_full.yaml"
    return _dry_run([str(recipe), "--slurm", *overrides], capsys)


def test_slurm_script_renders_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = REPO / "recipes" / "kimi_vl_a3b_4node_full.yaml"
    script = _slurm_script(capsys, "train.max_steps=10", "train.output_dir=/scratch/run 1")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=vlmtune-kimi_vl_a3b_4node_full", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00",
        f"#SBATCH --chdir={Path.cwd()}", "#SBATCH --exclusive"]
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert "MASTER_PORT=29500" in lines
    command = script[script.index("srun "):].replace("\\\n", " ")
    assert shlex.split(command) == [
        "srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable, "-m",
        "torch.distributed.run", "--nnodes", "4", "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint",
        "$MASTER_ADDR:$MASTER_PORT", "--rdzv_id", "$SLURM_JOB_ID", "-m", "vlmtune", "train", str(recipe.resolve()),
        "train.max_steps=10", "train.output_dir=/scratch/run 1"]
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}" in lines
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_slurm_flags_override_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    script = _slurm_script(capsys, "--nnodes", "2", "--nproc-per-node", "4", "--master-port", "31000",
                           "train.global_batch_size=64")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    assert "--nnodes 2 --nproc_per_node 4" in script and "MASTER_PORT=31000" in script
    assert "# Submit with: sbatch <this file>. 2 node(s) x 4 process(es) = world size 8;" in script


def test_slurm_script_runs_torchrun_on_every_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run the script with stand-ins for scontrol and srun: the rendezvous is the allocation's first node."""
    script = tmp_path / "job.sh"
    script.write_text(_slurm_script(capsys, "train.max_steps=3"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {"scontrol": "#!/bin/sh\nprintf 'gpu-017\\ngpu-018\\ngpu-019\\ngpu-020\\n'\n",
             "srun": "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\necho OMP=$OMP_NUM_THREADS\n"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[017-020]",
           "SLURM_JOB_ID": "4242", "SLURM_CPUS_ON_NODE": "96"}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    i = out.index("--rdzv_endpoint")
    assert out[i + 1] == "gpu-017:29500"
    assert out[out.index("--rdzv_id") + 1] == "4242"
    assert "OMP=12" in out  # 96 cores / 8 ranks
    assert out[out.index("train") + 2] == "train.max_steps=3"


def test_slurm_without_sbatch_writes_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    recipe = REPO / "recipes" / "kimi_vl_a3b_4node_full.yaml"
    out = tmp_path / "run"
    assert launcher.main([str(recipe), "--slurm", f"train.output_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert "sbatch is not on PATH" in err and str(out / "launch" / "sbatch.sh") in err
    assert (out / "launch" / "sbatch.sh").read_text().startswith("#!/bin/bash\n")
