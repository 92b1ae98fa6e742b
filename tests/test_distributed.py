"""Two processes on the CPU (gloo, torchrun through `nanguard train --nproc 2`): every rank takes the
same decision in the same step, the incident names the rank that went bad, the ranks end with the same
weights, and a run stopped (or a rank killed) and resumed ends as the run that never stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from nanguard.cli import main

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch has no gloo backend", allow_module_level=True)

ARGS = ["model.min_size=64", "model.max_size=64", "model.rpn_pre_nms_top_n_train=100",
        "model.rpn_post_nms_top_n_train=50", "model.box_batch_size_per_image=32", "train.batch_size=2",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_at_end=false", "train.threads=1", "data.prefetch=1"]


def nanguard(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "nanguard", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def train(run: Path, data: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    done = nanguard("train", "--nproc", str(nproc), "--quiet", "--out", str(run), f"data.root={data}", *ARGS, *extra)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final(run: Path) -> dict:
    return json.loads((run / "final.json").read_text())


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["backend"]["model"]


def test_faults_on_different_ranks_are_acted_on_together_and_explained(shapes, tmp_path):
    """A NaN image on rank 1, diagnosed from rank 1's batch (rank 0 writes the folder); an LR spike on
    rank 1 alone (its weights drift from rank 0's), then a flipped sign bit on rank 1: finite, and
    invisible to any norm, only the parameter digest across ranks sees it."""
    run = tmp_path / "both"
    train(run, shapes, "train.steps=18", "policy.snapshot_every=2", "policy.snapshot_healthy=1",
          "policy.snapshot_confirm=1", "guard.param_check_every=2",
          "--inject", "nan_input@4:rank=1", "--inject", "lr_spike@6:rank=1:factor=1000",
          "--inject", "weight_bitflip@13:rank=1:bit=31")
    incidents = {r["step"]: r for r in lines(run / "incidents.jsonl")}
    assert incidents[4]["bad_ranks"] == [1] and incidents[4]["action"] == "skip"
    [poisoned] = [r["detail"]["image_id"] for r in lines(run / "injections.jsonl") if r["kind"] == "nan_input"]
    diagnosis = incidents[4]["diagnosis"]
    assert (diagnosis["verdict"], diagnosis["rank"], diagnosis["image_ids"]) == ("bad_image", 1, [poisoned])
    assert (run / "incidents" / "4" / "replay.pt").is_file() and (run / "incidents" / "4" / "diagnosis.json").is_file()
    # rank 1 alone applied the blown-up update: the ranks' weights differ, which is caught and rolled back
    divergence = [r for r in incidents.values() if "rank_divergence" in r["kinds"]]
    assert divergence and divergence[0]["bad_ranks"] == [1] and divergence[0]["action"] == "rollback"
    flipped = [r for r in divergence if r["step"] > 13]
    assert flipped and flipped[0]["bad_ranks"] == [1] and flipped[0]["action"] == "rollback", \
        [(r["step"], r["kinds"], r["action"]) for r in incidents.values()]
    digests = final(run)["rank_param_digests"]
    assert digests[0] == digests[1] and final(run)["weights_finite"] and final(run)["status"] == "completed"
    # every rank's injections, each with its rank (rank 0 writes them at the checkpoints)
    assert [(r["step"], r["kind"], r["rank"]) for r in lines(run / "injections.jsonl")] == [
        (4, "nan_input", 1), (6, "lr_spike", 1), (13, "weight_bitflip", 1)]
    assert final(run)["injections"] == 3


def test_an_image_only_one_rank_cannot_read_is_skipped_by_every_rank(shapes, tmp_path):
    """A truncated image (its header intact: the audit reads headers) in one rank's share: that rank
    takes part in the step with a placeholder whose loss is non-finite, so both ranks skip it in the
    same step; no rank waits for a peer. The incident names the rank and its images; its stderr line
    names the image and the cause."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    broken = sorted((data / "train").iterdir())[5]
    broken.write_bytes(broken.read_bytes()[:200])
    run = tmp_path / "run"
    done = nanguard("train", "--nproc", "2", "--quiet", "--out", str(run), f"data.root={data}", *ARGS,
                    "train.steps=6", "policy.snapshot_confirm=1")
    assert done.returncode == 0, done.stderr[-3000:]
    image_id = int(broken.stem)
    [incident] = lines(run / "incidents.jsonl")
    [rank] = incident["bad_ranks"]
    assert image_id in incident["image_ids"] and len(incident["image_ids"]) == 2 and not incident["applied"]
    assert f"rank {rank}, step {incident['step']}: cannot read image(s)" in done.stderr and "truncated" in done.stderr
    digests = final(run)["rank_param_digests"]
    assert digests[0] == digests[1] and final(run)["status"] == "completed" and final(run)["skipped_steps"] == 1


# the run the stopped, resumed and killed runs of this config are compared with
FAULTY = ["train.steps=15", "train.checkpoint_every=3", "train.keep_checkpoints=5", "policy.snapshot_confirm=1", "--inject", "grad_nan@4:rank=1"]


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory) -> Path:
    """15 steps on two ranks, a NaN gradient on rank 1 at step 4, never interrupted."""
    run = tmp_path_factory.mktemp("distributed") / "straight"
    train(run, shapes, *FAULTY)
    return run


def test_a_gradient_fault_on_rank_1_is_skipped_by_both_and_named_and_another_nproc_is_refused(straight, capsys):
    incidents = lines(straight / "incidents.jsonl")
    assert [(r["step"], r["kind"], r["action"], r["bad_ranks"], r["applied"]) for r in incidents] == [
        (4, "nonfinite_grad", "skip", [1], False)]
    assert len(incidents[0]["image_ids"]) == 2  # rank 1's two images, not the global batch of four
    digests = final(straight)["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and final(straight)["status"] == "completed"
    # rank 1's injection, written once by rank 0
    assert [(r["step"], r["kind"], r["rank"]) for r in lines(straight / "injections.jsonl")] == [(4, "grad_nan", 1)]
    # on another number of ranks, or on one process: one line, exit 2, before any rank starts or any
    # file changes (in this process: nothing is launched)
    def files():
        return {p: p.stat().st_mtime_ns for p in straight.rglob("*") if p.name != ".nanguard.lock"}

    before = files()
    for other in (["--nproc", "1"], ["--nproc", "3"], []):
        assert main(["train", *other, "--quiet", "--resume", str(straight)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "written by 2 ranks" in err and "resume with the same --nproc (2)" in err, err
    assert files() == before


def test_one_process_under_the_launcher_trains_exactly_as_a_plain_run(shapes, tmp_path):
    """A single-process run is unchanged: under torchrun with one rank, no process group, no agree
    vector, no comm hook, and the same weights bit for bit as `nanguard train` without --nproc."""
    common = ["train.steps=6", "train.checkpoint_every=6", "--inject", "grad_nan@3"]
    train(tmp_path / "launched", shapes, *common, nproc=1)
    assert main(["train", "--quiet", "--out", str(tmp_path / "plain"), f"data.root={shapes}", *ARGS, *common]) == 0
    a, b = weights(tmp_path / "launched", 6), weights(tmp_path / "plain", 6)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert "rank_param_digests" not in final(tmp_path / "launched")  # one rank: nothing to compare
    losses = [[(r["total_loss"], r["grad_norm"]) for r in lines(tmp_path / run / "metrics.jsonl")] for run in ("launched", "plain")]
    assert losses[0] == losses[1]
    assert [(r["step"], r["bad_ranks"]) for r in lines(tmp_path / "launched" / "incidents.jsonl")] == [(3, [])]


def test_a_rank_killed_without_restarts_ends_the_job_in_seconds_and_the_run_resumes(straight, shapes, tmp_path):
    """No --max-restarts: a SIGKILLed rank ends the job within seconds (gloo sees the peer gone at once;
    torchrun's agent notices a dead rank within 0.1 s and stops the others, SIGKILL after 30 s), one line
    from each process that saw it, no traceback; `--resume` on two ranks then ends as the straight run."""
    run = tmp_path / "killed"
    launcher = kill_rank_1([sys.executable, "-m", "nanguard", "train", "--nproc", "2"], run, shapes, after_steps=7)
    killed = time.monotonic()
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1 and time.monotonic() - killed < 40, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "nanguard train: rank 1 (killed by signal 9) failed; the run folder keeps"), err[-3000:]
    assert all(line.startswith("nanguard train: rank ") for line in err.strip().splitlines()), err[-3000:]
    done = nanguard("train", "--nproc", "2", "--quiet", "--resume", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(straight, 15), weights(run, 15)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert [r["step"] for r in lines(run / "metrics.jsonl")] == list(range(15))
    assert [(r["step"], r["kind"], r["rank"]) for r in lines(run / "injections.jsonl")] == [(4, "grad_nan", 1)]


def kill_rank_1(launch: list[str], run: Path, shapes: Path, after_steps: int) -> subprocess.Popen:
    """`launch` + `--quiet --out RUN` and the FAULTY config, started; rank 1 SIGKILLed once
    `after_steps` steps are logged. Returns the launcher, still running."""
    launcher = subprocess.Popen([*launch, "--quiet", "--out", str(run), f"data.root={shapes}", *ARGS, *FAULTY], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO / "src")), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(lines(run / "metrics.jsonl")) < after_steps:
        time.sleep(0.05)
    pid = rank_pid(run, 1)
    assert pid is not None, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    return launcher


def rank_pid(run: Path, rank: int) -> int | None:
    """The pid of the training process of `rank` whose command names `run`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run).encode() in cmdline and b"nanguard" in cmdline and f"RANK={rank}".encode() in environ \
                and b"torch.distributed.run" not in cmdline:
            return int(proc.name)
    return None


def test_a_killed_rank_is_restarted_by_torchrun_and_ends_as_the_uninterrupted_run(straight, shapes, tmp_path):
    run = tmp_path / "killed"
    launcher = kill_rank_1([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "--max-restarts=1", "-m", "nanguard", "train"], run, shapes, after_steps=6)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-4000:]  # noqa

    a, b = weights(straight, 15), weights(run, 15)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert final(run)["rank_param_digests"] == final(straight)["rank_param_digests"]


RESTART_WORKER = """
import os, sys, time
import torch, torch.distributed as dist
from nanguard.backends.torch.distributed import init_process_group
from nanguard.run.ranks import Ranks
ranks = Ranks.from_env()
if ranks.restarts and ranks.rank == 1:
    time.sleep(3)  # the restarted peer is slow: rank 0 reads its key first
init_process_group(torch.device("cpu"), ranks)
total = torch.ones(1)
dist.all_reduce(total)
print(f"restart {ranks.restarts} rank {ranks.rank} sum {int(total.item())}", flush=True)
if not ranks.restarts:
    if ranks.rank == 1:
        os._exit(1)
    time.sleep(5)
dist.destroy_process_group()
"""


def test_a_restarted_job_meets_afresh_even_when_a_peer_is_slow(tmp_path):
    # torchrun keeps one store across restarts; the first attempt's addresses must not be dialled again
    script = tmp_path / "worker.py"
    script.write_text(RESTART_WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--max-restarts=1", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    # the two processes share one pipe: their lines may interleave
    assert sorted(re.findall(r"restart 1 rank \d sum \d", done.stdout)) == [
        "restart 1 rank 0 sum 2", "restart 1 rank 1 sum 2"]
