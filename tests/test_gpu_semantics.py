"""What CPU can show of multi-GPU correctness: a killed 2-rank run with dropout resumes bitwise, also when only
rank 0 can see the checkpoint; every rank keeps its own random stream across a resume; and under fp16 the loss
scaler's ordinary back-offs are not counted as failed steps.

The 2-rank runs go through a small wrapper of train.py that records, at every training-mode dropout call, a hash
of the process's CPU RNG state (without drawing from it), one file per rank: the masks each rank draws are a
function of that state, so the records show whose stream a rank continues after a resume.
"""
import glob
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# Digits with the default 8x8 UNet and dropout, so that every training step draws masks from the global RNG.
RUN = ["--algo", "cd", "--data", "digits", "--dropout", "0.1", "--batch", "8", "--iters", "12", "--ckpt-every", "4",
       "--log-every", "4", "--eval-samples", "8"]

RECORDER = """
import hashlib, os, runpy, sys
import torch
import torch.nn.functional as F
real, out = F.dropout, open(os.path.join(os.environ["RNG_RECORD"], f"rank{os.environ.get('RANK', '0')}.txt"), "a")
def dropout(input, p=0.5, training=True, inplace=False):
    if training and p > 0:  # the state the mask is drawn from
        out.write(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest() + "\\n")
        out.flush()
    return real(input, p, training, inplace)
F.dropout = dropout
sys.path.insert(0, ROOT_PATH)
sys.argv = [os.path.join(ROOT_PATH, "train.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    path = tmp_path_factory.mktemp("recorder") / "record_rng.py"
    path.write_text(RECORDER.replace("ROOT_PATH", repr(ROOT)))
    return path


def torchrun(recorder, outdir, record, *extra):
    record.mkdir(exist_ok=True)
    p = subprocess.run([*TORCHRUN, str(recorder), *RUN, "--outdir", str(outdir), *extra], capture_output=True,
                       text=True, env=dict(ENV, RNG_RECORD=str(record)), cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(script, args, cwds, env=()):
    """The two ranks started by hand, as torchrun's environment would start them (each in its own folder)."""
    env = dict(ENV, **dict(env), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2")
    return [subprocess.Popen([sys.executable, str(script), *map(str, args)], env=dict(env, RANK=str(r),
                             LOCAL_RANK=str(r)), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r, cwd in enumerate(cwds)]


def records(folder):
    return [(folder / f"rank{r}.txt").read_text().split() for r in (0, 1)]


def final(outdir):
    return torch.load(sorted(glob.glob(os.path.join(outdir, "ckpt-*.pt")))[-1], weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, recorder):
    d = tmp_path_factory.mktemp("straight")
    torchrun(recorder, d / "run", d / "rng")
    return d


@pytest.fixture(scope="module")
def killed(tmp_path_factory, recorder):
    """A 2-rank run whose two processes are SIGKILLed right after its first checkpoint."""
    d = tmp_path_factory.mktemp("killed")
    (d / "rng").mkdir()
    procs = ranks(recorder, [*RUN, "--outdir", d / "run"], [ROOT, ROOT], env={"RNG_RECORD": str(d / "rng")})
    while not (d / "run" / "ckpt-0000004.pt").exists() and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    for p in procs:
        p.kill()
        p.communicate()
    steps = [int(os.path.basename(f)[5:12]) for f in glob.glob(str(d / "run" / "ckpt-*.pt"))]
    assert steps and max(steps) < 12, "the run finished before it could be killed; the test would prove nothing"
    return d / "run"


def assert_bitwise_equal(a, b):
    assert a["step"] == b["step"] == 12
    for part in ("net", "net_ema", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, recorder, killed):
    d = tmp_path_factory.mktemp("resumed")
    shutil.copytree(killed, d / "run")
    p = torchrun(recorder, d / "run", d / "rng", "--resume")
    assert "resumed from" in p.stdout
    return d


def test_a_killed_two_rank_run_with_dropout_resumes_bitwise(straight, resumed):
    assert_bitwise_equal(final(straight / "run"), final(resumed / "run"))


def test_after_a_resume_every_rank_continues_its_own_random_stream(straight, resumed):
    whole, after = records(straight / "rng"), records(resumed / "rng")
    for r in (0, 1):
        assert after[r] and len(after[r]) < len(whole[r])
        assert after[r] == whole[r][-len(after[r]):], f"rank {r} does not continue its own stream"
    assert after[0][0] != after[1][0], "both ranks draw the same dropout masks after the resume"
    assert whole[0][0] != whole[1][0]


def test_a_resume_where_only_rank_0_can_see_the_checkpoint(tmp_path, straight, killed):
    # Two "nodes" without a shared filesystem: each rank runs in its own folder with the same relative --outdir,
    # and only rank 0's folder holds the killed run. Rank 1 must be given the state by rank 0.
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(killed, node0 / "run")
    node1.mkdir()
    procs = ranks(os.path.join(ROOT, "train.py"), [*RUN, "--outdir", "run", "--resume"], [node0, node1])
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-5000:]
    assert "resumed from" in outs[0][0]
    assert_bitwise_equal(final(straight / "run"), final(node0 / "run"))
    assert not os.listdir(node1), "rank 1 wrote into its folder"


# ------------------------------------------------------------------------------------------------ fp16 loss scaling
INJECT = """
import runpy, sys
sys.path.insert(0, {root!r})
import algorithms.edm as edm
real, calls = edm.loss, [0]
def loss(*a, **k):  # a non-finite loss at the iterations in {bad}
    calls[0] += 1
    out = real(*a, **k)
    return out * float("inf") if calls[0] - 1 in {bad} else out
edm.loss = loss
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path({root!r} + "/train.py", run_name="__main__")
"""
SMALL = ["--algo", "edm", "--batch", "32", "--eval-samples", "16", "--log-every", "5"]


def inject(bad, *args):
    return subprocess.run([sys.executable, "-c", INJECT.format(root=ROOT, bad=bad), *SMALL, *args],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)


def test_fp16_overflows_the_scaler_backs_off_from_are_not_failed_steps(tmp_path):
    # Ten overflows in a row: GradScaler halves its scale ten times (2^16 -> 2^6) and training goes on.
    p = inject(set(range(10)), "--precision", "fp16", "--iters", "15", "--max-skips", "2", "--ckpt-every", "15",
               "--outdir", tmp_path / "fp16")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "step skipped" not in p.stdout and "skipped 0" in p.stdout
    assert final(tmp_path / "fp16")["scaler"]["scale"] == 2.0 ** 6
    # The same ten non-finite steps in fp32 are failures: the run stops at the second.
    p = inject(set(range(10)), "--iters", "15", "--max-skips", "2", "--outdir", tmp_path / "fp32")
    assert p.returncode != 0 and "stopping: 2 non-finite steps in a row at iteration 1" in p.stderr


def test_fp16_counts_non_finite_steps_once_the_scale_has_fallen_below_one(tmp_path):
    # Always non-finite: 16 back-offs take the scale from 2^16 to 1; from there on each step counts.
    p = inject(set(range(100)), "--precision", "fp16", "--iters", "50", "--max-skips", "3", "--outdir", tmp_path)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "stopping: 3 non-finite steps in a row at iteration 18" in p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    assert "iteration 16: non-finite loss or gradient, step skipped (1 in a row)" in p.stdout
