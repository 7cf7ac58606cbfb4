"""train.py --algo mcm --ct: multistep consistency training (Heek et al., arXiv:2403.06807v3, Alg. 1 with the true x
as the teacher's x̂), from random weights and from a diffusion run of train.py, end to end as a user runs it.

That the CT loss with one teacher step per segment is the diffusion loss (the paper's many-step limit, Sec. 3) is
`tests/test_mcm.py::test_ct_loss_with_one_teacher_step_per_segment_is_a_diffusion_loss`; here only the runs."""
import glob
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SMALL = ["--batch", "32", "--eval-samples", "64", "--log-every", "2", "--student-steps", "2"]


def run(args, check=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=600)
    if check and p.returncode:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def newest_checkpoint(outdir):
    return torch.load(sorted(glob.glob(os.path.join(outdir, "ckpt-*.pt")))[-1], weights_only=True)


def test_ct_from_random_weights_writes_metrics_against_the_exact_ode_only(tmp_path):
    run(["--algo", "mcm", "--ct", "--iters", "4", "--outdir", str(tmp_path), *SMALL])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["ct"] is True and m["iters"] == 4 and list(m["by_nfe"]) == ["2"]  # S = 2 samples with 2 NFE (Alg. 2)
    r = m["by_nfe"]["2"]
    # CT has no teacher: the only reference is the toy's exact ODE
    assert set(k for k in r if k.startswith("vs_")) == {"vs_exact_ode"}
    e = r["vs_exact_ode"]
    assert e["n"] == 64 and e["gap_mean"] > 0 and e["gap_se"] > 0 and 0 <= e["energy_to_ode_p"] <= 1


def test_ct_from_an_edm_run_starts_from_its_weights_and_trains_them(tmp_path):
    teacher = tmp_path / "teacher"
    run(["--algo", "edm", "--data", "two_modes", "--iters", "4", "--batch", "32", "--eval-samples", "16",
         "--outdir", str(teacher)])
    student = tmp_path / "student"
    lr, iters = 1e-6, 3
    run(["--algo", "mcm", "--ct", "--teacher", str(teacher), "--init-from-teacher", "--iters", str(iters),
         "--lr", str(lr), "--ckpt-every", str(iters), "--outdir", str(student), *SMALL])
    t, s = newest_checkpoint(teacher)["ema"], newest_checkpoint(student)["net"]
    diff = max((s[k] - t[k]).abs().max().item() for k in t)
    # Adam moves each weight by about lr per step, so a student started from the teacher stays within a few lr·iters
    # of it (a random initialisation is ~0.1 away), and training moves it (diff > 0).
    assert 0 < diff < 10 * lr * iters
    assert json.loads((student / "metrics.json").read_text())["by_nfe"]["2"]["vs_exact_ode"]["gap_mean"] > 0


def test_ct_with_a_teacher_but_without_init_from_teacher_is_refused(tmp_path):
    p = run(["--algo", "mcm", "--ct", "--teacher", str(tmp_path), "--outdir", str(tmp_path / "out")], check=False)
    assert p.returncode == 2 and "--teacher with --ct only initialises the student: add --init-from-teacher" in p.stderr
