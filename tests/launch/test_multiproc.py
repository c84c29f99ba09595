"""Multi-process training on CPU (torchrun + gloo): the world size changes nothing but the speed.

* 1 rank vs 2 ranks (`vlmtune launch --nproc-per-node 2`), ZeRO-2 and ZeRO-3, same train.global_batch_size (4 packs
  a step: 1 rank x 4 accumulation steps, or 2 ranks x 2): the same per-step losses and the same final weights within
  1e-5 in fp32 (token-mean loss over the whole step, the global batch split across ranks).
* 2 "nodes" on localhost (two launcher processes, nnodes=2, nproc 1, node ranks 0 and 1): the same losses again.
* A checkpoint written by 2 ranks resumes on 1 and vice versa (vlmtune.train.reshard), steps 3-4 continuing the
  uninterrupted run within 1e-5.
* A rank killed mid-run: the launcher exits 1 within a second or two with one line naming the rank and the signal.

Measured on 2 cores (fp32, 4 steps): max |loss(1 rank) - loss(2 ranks)| 2.4e-7 (ZeRO-2) / 0 (ZeRO-3), final weights
within 2.7e-7 / 1.7e-7; resumed runs within 2.4e-7 of the uninterrupted one; a killed rank ends the launch 0.5 s later.
Launch overhead (start -> first step logged): `vlmtune train` 5.1 s, `vlmtune launch` with 1 rank 6.1 s, with 2 ranks
8.8 s (interpreter, torch + DeepSpeed imports and the gloo rendezvous of each rank, on 2 shared cores). The file takes
~160 s (each test under 40 s), hence the slow mark.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.launch.conftest import (
    PYTHON,
    REPO,
    Assets,
    clean_env,
    final_weights,
    free_port,
    losses,
    metrics,
    run,
    write_recipe,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TOL = 1e-5
DRIVER = str(Path(__file__).resolve().parent / "_reshard_train.py")


def _launch(recipe: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    return run(["-m", "vlmtune.launch.launcher", str(recipe), "--nproc-per-node", str(nproc), "--master-port",
                str(free_port()), *extra])


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def runs(request: pytest.FixtureRequest, assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same recipe (4 steps, checkpoints at steps 2 and 4) on 1 rank and, through the launcher, on 2 ranks."""
    stage = request.param
    root = tmp_path_factory.mktemp(f"zero{stage}")
    recipe = write_recipe(root / "recipe.yaml", assets, deepspeed={"zero_stage": stage},
                          train={"save_every": 2, "keep_last": None})
    one, two = root / "one", root / "two"
    run(["-m", "vlmtune", "train", str(recipe), f"train.output_dir={one}"])
    _launch(recipe, 2, f"train.output_dir={two}")
    return {"stage": stage, "recipe": recipe, "root": root, 1: one, 2: two}


def test_two_ranks_match_one_rank(runs: dict) -> None:
    one, two = runs[1], runs[2]
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3, 4]
    # the same packs per optimizer step: tokens and supervised tokens of every step agree exactly
    assert [(r["tokens"], r["supervised_tokens"], r["samples"]) for r in m1] == [
        (r["tokens"], r["supervised_tokens"], r["samples"]) for r in m2]
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) <= TOL, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= TOL * max(1.0, a["grad_norm"])
    assert m1[-1]["loss"] < m1[0]["loss"]  # it trains
    w1 = final_weights(one / "checkpoints" / "step-00000004")
    w2 = final_weights(two / "checkpoints" / "step-00000004")
    assert w1.keys() == w2.keys() and len(w1) > 100
    worst = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    assert worst <= TOL, worst
    print(f"ZeRO-{runs['stage']}: max |loss(1 rank) - loss(2 ranks)| "
          f"{max(abs(a['loss'] - b['loss']) for a, b in zip(m1, m2)):.2e}, final weights {worst:.2e}")


@pytest.mark.parametrize("source,target", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_world_size(runs: dict, source: int, target: int) -> None:
    """Steps 3-4 resumed from the step-2 checkpoint of a `source`-rank run on `target` ranks == the uninterrupted run."""
    checkpoint = runs[source] / "checkpoints" / "step-00000002"
    out = runs["root"] / f"resumed_{source}to{target}"
    overrides = [str(runs["recipe"]), f"train.output_dir={out}", f"train.resume={checkpoint}"]
    if target == 1:
        run([DRIVER, *overrides])
    else:
        run(["-m", "torch.distributed.run", "--nproc_per_node", str(target), "--master_port", str(free_port()),
             DRIVER, *overrides])
    resumed, reference = losses(out), losses(runs[source])
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - reference[step]) <= TOL, (step, resumed[step], reference[step])
        assert abs(resumed[step] - losses(runs[target])[step]) <= TOL
    w_resumed = final_weights(out / "checkpoints" / "step-00000004")
    w_reference = final_weights(runs[source] / "checkpoints" / "step-00000004")
    assert max(float((w_resumed[k] - w_reference[k]).abs().max()) for k in w_reference) <= TOL
    assert (checkpoint / "engine" / "universal" / "zero").is_dir()  # consolidated once, kept for the next resume
    print(f"ZeRO-{runs['stage']} {source} -> {target} ranks: max |loss - uninterrupted| "
          f"{max(abs(resumed[s] - reference[s]) for s in (3, 4)):.2e}")


def test_two_nodes_on_localhost(assets: Assets, tmp_path: Path) -> None:
    """nnodes=2, one rank each, two launcher processes on one host: the same run as 2 ranks on one node."""
    recipe = write_recipe(tmp_path / "recipe.yaml", assets)
    port = str(free_port())
    outs = {}
    procs = []
    for node in (0, 1):
        out = tmp_path / "run"
        outs[node] = out
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "vlmtune.launch.launcher", str(recipe), "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port,
             f"train.output_dir={out}"], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "node 1 of 2, 1 rank(s) here, world size 2" in logs[1]
    two_nodes = metrics(outs[0])
    assert [r["step"] for r in two_nodes] == [1, 2, 3, 4]
    one = tmp_path / "one"
    run(["-m", "vlmtune", "train", str(recipe), f"train.output_dir={one}"])
    for a, b in zip(metrics(one), two_nodes):
        assert abs(a["loss"] - b["loss"]) <= TOL, (a["step"], a["loss"], b["loss"])


def _rank_pid(output_dir: Path, rank: int) -> int | None:
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if f"train.output_dir={output_dir}" in cmd and "vlmtune train" in cmd.replace("-m vlmtune ", "vlmtune "):
                if proc.environ().get("RANK") == str(rank):
                    return proc.info["pid"]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_killed_rank_ends_the_launch_with_a_message(assets: Assets, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, train={"max_steps": 10_000},
                          launch={"collective_timeout_s": 60})
    out = tmp_path / "run"
    started = time.monotonic()
    proc = subprocess.Popen([PYTHON, "-m", "vlmtune.launch.launcher", str(recipe), "--nproc-per-node", "2",
                             "--master-port", str(free_port()), f"train.output_dir={out}"], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() - started < 180, "no step within 180 s"
            time.sleep(0.2)
        first_step = time.monotonic() - started
        pid = _rank_pid(out, 1)
        assert pid is not None, "rank 1's process not found"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = proc.communicate(timeout=60)  # the collective timeout of the recipe
        ended = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("vlmtune launch: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert f"rank 1 (local rank 1, pid {pid}) was killed by signal SIGKILL" in errors[0]
    assert "torchrun then stopped rank(s) 0" in errors[0]
    assert ended < 30, f"the launcher took {ended:.1f} s to exit after the kill"
    print(f"launch overhead (launcher start -> first step logged, 2 ranks): {first_step:.1f} s; exit {ended:.2f} s "
          "after the kill")


def test_resharded_state_matches_the_partitions(runs: dict) -> None:
    """The consolidated (universal) tensors equal DeepSpeed's own fp32 consolidation of the same checkpoint."""
    from vlmtune.train.reshard import convert_to_universal

    checkpoint = runs[2] / "checkpoints" / "step-00000004"
    universal = convert_to_universal(checkpoint)
    reference = final_weights(checkpoint)  # parameters, and under ZeRO-3 the buffers too
    buffer = "e_score_correction_bias"  # a buffer: in the consolidations of some stages, never trained
    stored_names = {p.name for p in (universal / "zero").iterdir() if (p / "fp32.pt").is_file()}
    stored_names = {n for n in stored_names if not n.endswith(buffer)}
    assert stored_names == {n for n in reference if not n.endswith(buffer)} and len(stored_names) > 100
    for name in sorted(stored_names):
        tensor = reference[name]
        stored = torch.load(universal / "zero" / name / "fp32.pt", weights_only=False)
        stored = stored["param"] if isinstance(stored, dict) else stored
        assert torch.equal(stored.reshape(tensor.shape), tensor), name
