"""train.py for real runs: DDP equivalence, exact resume after a kill, corrupt checkpoints, mixed
precision and the non-finite guard, argument errors. Every run here is a real subprocess on CPU (gloo)."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")
SMALL = ["--batch", "32", "--eval-samples", "100", "--log-every", "5"]


def cmd(args, launcher=(sys.executable,)):
    return [*launcher, os.path.join(ROOT, "train.py"), *args]


def run(args, launcher=(sys.executable,), check=True):
    p = subprocess.run(cmd(args, launcher), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    if check and p.returncode:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def final_weights(outdir):
    newest = sorted(glob.glob(os.path.join(outdir, "ckpt-*.pt")))[-1]
    return torch.load(newest, weights_only=True)


@pytest.mark.parametrize("algo", ["edm", "cd"])
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, algo):
    common = ["--algo", algo, "--iters", "10", "--ckpt-every", "10", *SMALL]
    run([*common, "--outdir", str(tmp_path / "one"), "--batch-gpu", "16"])  # 1 rank, 2 micro-batches of 16
    run([*common, "--outdir", str(tmp_path / "two")], launcher=(*TORCHRUN, "--nproc_per_node=2"))  # 2 ranks of 16
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in one["net"]:
        torch.testing.assert_close(one["net"][k], two["net"][k], rtol=1e-4, atol=1e-6)  # float sums differ in order
    assert not torch.equal(one["net"][k], torch.zeros_like(one["net"][k]))


def test_a_killed_and_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    common = ["--algo", "cd", "--iters", "60", "--ckpt-every", "10", *SMALL]
    run([*common, "--outdir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    p = subprocess.Popen(cmd([*common, "--outdir", str(killed)]), env=ENV, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not glob.glob(str(killed / "ckpt-0000020.pt")) and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    reached = max(int(os.path.basename(f)[5:12]) for f in glob.glob(str(killed / "ckpt-*.pt")))
    assert reached < 60, "the run finished before it could be killed; the test proves nothing"
    out = run([*common, "--outdir", str(killed), "--resume"]).stdout
    assert "resumed from" in out
    a, b = final_weights(tmp_path / "straight"), final_weights(killed)
    assert a["step"] == b["step"] == 60
    for part in ("net", "net_ema", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_a_truncated_checkpoint_is_refused_and_the_previous_good_one_is_used(tmp_path):
    common = ["--algo", "edm", "--ckpt-every", "10", *SMALL, "--outdir", str(tmp_path)]
    run([*common, "--iters", "20"])
    newest = tmp_path / "ckpt-0000020.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # as if the disk filled up mid-write by another tool
    out = run([*common, "--iters", "30", "--resume"]).stdout
    assert "skipping unreadable checkpoint" in out and "ckpt-0000020.pt" in out
    assert "resumed from" in out and "ckpt-0000010.pt" in out
    assert newest.exists()  # kept for the user to inspect, never deleted silently


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_on_cpu(tmp_path, precision):
    run(["--algo", "cd", "--iters", "10", "--precision", precision, *SMALL, "--outdir", str(tmp_path)])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert all(math.isfinite(v["vs_exact_ode"]["gap_mean"]) for v in m["by_nfe"].values())
    if precision == "fp16":
        assert "scale" in torch.load(sorted(tmp_path.glob("ckpt-*.pt"))[-1], weights_only=True)["scaler"]


INJECT = """
import runpy, sys, torch
import algorithms.edm as edm
real, calls = edm.loss, [0]
def loss(*a, **k):  # a non-finite loss at iterations {bad}
    calls[0] += 1
    out = real(*a, **k)
    return out * float("inf") if calls[0] - 1 in {bad} else out
edm.loss = loss
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_an_injected_inf_is_skipped_and_logged(tmp_path):
    p = subprocess.run([sys.executable, "-c", INJECT.format(bad={3}), "--algo", "edm", "--iters", "10",
                        *SMALL, "--outdir", str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "iteration 3: non-finite loss or gradient, step skipped (1 in a row)" in p.stdout
    stats = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["skipped"] == 1


def test_non_finite_steps_in_a_row_stop_the_run_with_a_clear_message(tmp_path):
    p = subprocess.run([sys.executable, "-c", INJECT.format(bad=set(range(100))), "--algo", "edm", "--iters", "50",
                        "--max-skips", "4", *SMALL, "--outdir", str(tmp_path)], capture_output=True, text=True,
                       env=ENV, cwd=ROOT)
    assert p.returncode != 0 and "stopping: 4 non-finite steps in a row at iteration 3" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--algo", "edm", "--precond", "analytic"], "--precond applies to --algo cd or ctm, not edm"),
    (["--algo", "cd", "--student-steps", "4"], "--student-steps applies to --algo mcm, not cd"),
    (["--algo", "edm", "--teacher", "x.pkl"], "--teacher applies to --algo cd or ctm or mcm, not edm"),
    (["--algo", "cd", "--init-from-teacher"], "--init-from-teacher needs a teacher network"),
    (["--algo", "cd", "--data", "npz:/nonexistent.npz"], "/nonexistent.npz: no such file"),
    (["--algo", "cd", "--teacher", "/nonexistent.pt"], "--teacher /nonexistent.pt"),
    (["--algo", "cd", "--arch", "tiny-uvit-8"], "--arch applies to image data, not the 2D toy 'ring8'"),
    (["--algo", "cd", "--cond", "--data", "spiral"], "--cond: the dataset 'spiral' has no class labels"),
])
def test_the_cli_rejects_bad_combinations_with_a_message(tmp_path, args, message):
    p = run([*args, "--outdir", str(tmp_path)], check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr


def test_a_teacher_that_does_not_match_the_data_is_refused_before_training(tmp_path):
    import numpy as np

    run(["--algo", "edm", "--data", "digits", "--iters", "2", "--ckpt-every", "2", "--batch", "8", "--eval-samples",
         "8", "--outdir", str(tmp_path / "teacher")])  # a 1-channel 8x8 teacher
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    ckpt = sorted((tmp_path / "teacher").glob("ckpt-*.pt"))[-1]
    p = run(["--algo", "cd", "--data", f"npz:{rgb}", "--teacher", str(ckpt), "--outdir", str(tmp_path / "cd")],
            check=False)
    assert p.returncode == 2 and f"--teacher {ckpt}" in p.stderr, p.stderr
    assert "trained on 'digits' [1, 8, 8]" in p.stderr, p.stderr
    assert not (tmp_path / "cd").exists()  # refused before anything was written
