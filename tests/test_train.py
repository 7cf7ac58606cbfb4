"""train.py end to end, as a user runs it: python and torchrun, outputs, and argument errors."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run(args, launcher=(sys.executable,), check=True):
    p = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=600)
    if check and p.returncode:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


QUICK = ["--iters", "20", "--log-every", "10", "--eval-samples", "200", "--batch", "64"]


def test_edm_run_prints_progress_and_writes_metrics_stats_and_a_picture(tmp_path):
    p = run(["--algo", "edm", "--outdir", str(tmp_path), *QUICK])
    assert "iter     20/20" in p.stdout and "ETA" in p.stdout
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["iters"] == 20 and list(m["by_nfe"]) == ["35"]  # Heun with 18 steps: 35 NFE
    r = m["by_nfe"]["35"]["vs_exact_ode"]  # the EDM student against the exact teacher's ODE from the same noise
    assert r["n"] == 200 and r["gap_mean"] > 0 and r["gap_se"] > 0 and 0 <= r["energy_to_ode_p"] <= 1
    assert [json.loads(l)["iter"] for l in (tmp_path / "stats.jsonl").read_text().splitlines()] == [10, 20]
    assert (tmp_path / "samples.png").stat().st_size > 1000


def test_torchrun_single_process_gives_the_same_result_as_python(tmp_path):
    a, b = tmp_path / "python", tmp_path / "torchrun"
    run(["--algo", "edm", "--outdir", str(a), *QUICK])
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    run(["--algo", "edm", "--outdir", str(b), *QUICK], launcher=torchrun)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["by_nfe"] == mb["by_nfe"]


@pytest.mark.parametrize("args, message", [
    (["--algo", "nope"], "invalid choice: 'nope'"),
    (["--algo", "edm", "--data", "moons"], "unknown dataset spec 'moons'"),
    (["--algo", "edm", "--batch", "60", "--batch-gpu", "7"], "--batch-gpu 7 does not divide"),
])
def test_bad_arguments_are_refused_with_a_message_naming_them(tmp_path, args, message):
    p = run([*args, "--outdir", str(tmp_path)], check=False)
    assert p.returncode == 2 and message in p.stderr


@pytest.mark.parametrize("algo", ["cd", "ctm", "mcm"])
def test_image_runs_distil_the_exact_digits_teacher_with_a_unet(tmp_path, algo):
    pytest.importorskip("sklearn")
    extra = ["--student-steps", "2"] if algo == "mcm" else []
    run(["--algo", algo, "--data", "digits", "--iters", "3", "--batch", "8", "--eval-samples", "8", "--log-every", "1",
         "--ckpt-every", "3", "--outdir", str(tmp_path), *extra])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["data"] == "digits" and all(v["vs_exact_ode"]["gap_mean"] > 0 for v in m["by_nfe"].values())
    assert (tmp_path / "samples.png").stat().st_size > 1000 and (tmp_path / "samples-0000003.png").exists()
