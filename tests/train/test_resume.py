"""SIGKILL-safe resume: a run killed at any point and rerun with the same command logs the same per-step losses as an
uninterrupted run, with exactly one metrics.jsonl line per step; a checkpoint killed mid-save is ignored and removed;
resume=never and a changed recipe refuse to start.

Measured (fp32, one process, 6 steps): resumed losses are bit-identical to the uninterrupted run's (difference 0.0),
whether killed after step 3's checkpoint or during step 4's save, under ZeRO-2 and ZeRO-3 (with checkpointing).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.conftest import (
    PYTHON,
    REPO,
    SCRIPTS,
    Assets,
    clean_env,
    launcher_env_restored,
    make_recipe,
    read_steps,
    run_cli,
    run_in_process,
)

STEPS = 6
TIMEOUT = 240


def _sections(stage: int) -> dict:
    """ZeRO-2 with the test defaults, or ZeRO-3 with decoder + vision checkpointing (the other code paths)."""
    if stage == 2:
        return {"train": {"save_every": 2}}
    return {"train": {"save_every": 2}, "deepspeed": {"zero_stage": 3},
            "model": {"path": None, "dtype": "float32", "attention": "sdpa_varlen",
                      "gradient_checkpointing": {"decoder": True, "vision": True}}}


def _recipe(assets: Assets, root: Path, stage: int, overrides: tuple[str, ...] = (), **train: object):
    sections = _sections(stage)
    sections["train"] = {**sections["train"], **train}
    if "model" in sections:
        sections["model"]["path"] = str(assets.model)
    return make_recipe(assets, root, "run", overrides, **sections)


@pytest.fixture(scope="module")
def uninterrupted(assets: Assets, tmp_path_factory: pytest.TempPathFactory):
    """uninterrupted(stage) -> output dir of a 6-step run (checkpoints at 2, 4, 6), run once per stage. Tests copy
    it before changing it."""
    done: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in done:
            recipe, _ = _recipe(assets, tmp_path_factory.mktemp(f"straight_z{stage}"), stage)
            run_in_process(recipe)
            done[stage] = Path(recipe.train.output_dir)
        return done[stage]

    return get


@pytest.fixture
def straight(uninterrupted) -> Path:
    return uninterrupted(2)


def _losses(out: Path) -> list[float]:
    steps = read_steps(out)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), "metrics.jsonl: not exactly one line per step"
    return [r["loss"] for r in steps]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "latest")


@pytest.mark.slow  # killed subprocess runs, 15-25 s
def test_sigkill_after_half_resumes_exactly(assets: Assets, straight: Path, tmp_path: Path) -> None:
    _, path = _recipe(assets, tmp_path, 2, save_every=STEPS // 2)
    out = tmp_path / "run"
    latest = out / "checkpoints" / "latest"
    proc = subprocess.Popen([PYTHON, "-m", "vlmtune", "train", str(path)], cwd=REPO, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + TIMEOUT
    try:
        while not (latest.is_file() and latest.read_text().strip() == "step-00000003"):
            assert proc.poll() is None, f"the run ended before step 3's checkpoint:\n{proc.stderr.read()}"
            assert time.time() < deadline, "no checkpoint at step 3 in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert "step-00000006" not in _checkpoints(out)  # killed before the end

    res = run_cli(["train", str(path)], timeout=TIMEOUT)  # the same command again: train.resume=auto
    assert res.returncode == 0, res.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-00000003'} at step 3" in res.stderr
    assert _losses(out) == _losses(straight)  # bit-identical
    assert _checkpoints(out) == ["step-00000003", "step-00000006"]


@pytest.mark.slow  # killed subprocess runs, 15-25 s
@pytest.mark.parametrize(("at", "stage"), [("engine", 2), ("finalize", 3)])
def test_checkpoint_killed_mid_save_is_ignored(assets: Assets, uninterrupted, tmp_path: Path, at: str,
                                               stage: int) -> None:
    """Killed while writing step 4's checkpoint (half the files / all files but not renamed): the rerun resumes from
    step 2, removes the temporary folder and reproduces the uninterrupted losses. ZeRO-2, and ZeRO-3 with
    activation checkpointing (partitioned parameters and optimizer state)."""
    _, path = _recipe(assets, tmp_path, stage)
    out = tmp_path / "run"
    killed = subprocess.run([PYTHON, str(SCRIPTS / "kill_during_save.py"), "--step", "4", "--at", at, str(path)],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _checkpoints(out) == [".tmp-step-00000004", "step-00000002"]
    tmp = out / "checkpoints" / ".tmp-step-00000004"
    assert (tmp / "trainer_state.json").is_file() == (at == "finalize")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert [r["step"] for r in read_steps(out)] == [1, 2, 3, 4]

    res = run_cli(["train", str(path)], timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert "removed checkpoints killed mid-save: .tmp-step-00000004" in res.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in res.stderr
    assert _losses(out) == _losses(uninterrupted(stage))
    assert _checkpoints(out) == ["step-00000002", "step-00000004", "step-00000006"]


def _copy_run(straight: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    return out


def test_resume_never_with_checkpoints_refuses(assets: Assets, straight: Path, tmp_path: Path) -> None:
    from vlmtune.train.trainer import TrainError

    out = _copy_run(straight, tmp_path)
    recipe, _ = _recipe(assets, tmp_path, 2, ("train.resume=never",))
    before = (out / "recipe.resolved.yaml").read_bytes()
    with pytest.raises(TrainError, match=r"train.resume=never but .*checkpoints holds checkpoints"):
        run_in_process(recipe)
    assert (out / "recipe.resolved.yaml").read_bytes() == before  # the refused run wrote nothing


def test_changed_recipe_refuses_unless_told(assets: Assets, straight: Path, tmp_path: Path) -> None:
    from vlmtune.train.trainer import TrainError

    out = _copy_run(straight, tmp_path)
    changed = ("train.learning_rate=0.002", "train.max_steps=7")  # max_steps may change freely, the lr may not
    recipe, _ = _recipe(assets, tmp_path, 2, tuple(changed))
    with pytest.raises(TrainError, match=r"(?s)changed since this checkpoint.*train.learning_rate: 0.001 -> 0.002"
                                         r".*train.resume_ignore_changes=true") as err:
        run_in_process(recipe)
    assert "max_steps" not in str(err.value)
    assert len(read_steps(out)) == STEPS

    recipe, _ = _recipe(assets, tmp_path, 2, (*changed, "train.resume_ignore_changes=true"))
    steps = run_in_process(recipe)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 2))
    assert [r["loss"] for r in steps[:STEPS]] == _losses(straight)
    assert steps[-1]["lr"] == 0.002


def test_cli_reports_a_refused_resume_in_one_line(assets: Assets, straight: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`vlmtune train` with another data order than the checkpoint's (seed changed, changes allowed): the loader
    refuses to resume, and the CLI says so in one line (exit 1), not in a traceback."""
    from vlmtune.train import trainer

    out = _copy_run(straight, tmp_path)
    _, path = _recipe(assets, tmp_path, 2)
    with launcher_env_restored():
        rc = trainer.main([str(path), "train.seed=5", f"train.max_steps={STEPS + 2}", "train.resume_ignore_changes=true"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("vlmtune train: error:")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err
    assert "train.seed" in errors[0]
    assert len(read_steps(out)) == STEPS  # nothing was appended
