"""Every bad input to train.py and generate.py is refused before any work, and no run folder is ever touched.

Each case runs the script as a user would (a subprocess, cwd an empty folder) and checks that it exits with 2
through the argument parser (`train.py: error: ...`), without a traceback, with a message that names the flag or
file, before the first iteration (no `iter ` progress line), writing nothing: a fresh --outdir is not created, the
working folder stays empty, and the finished runs made once for this module are byte-for-byte unchanged.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from networks.edm_unet import SONGUNET_CONFIGS, SongUNet
from edm_pickle import marker_src, write_edm_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# The finished runs every case is checked against: 2 checkpoints, stats, metrics and pictures each.
FINISHED = ["--algo", "cd", "--iters", "4", "--batch", "16", "--eval-samples", "64", "--ckpt-every", "2",
            "--log-every", "2"]
MCM = ["--algo", "mcm", "--student-steps", "2", "--iters", "2", "--batch", "16", "--eval-samples", "16",
       "--ckpt-every", "2", "--log-every", "1"]
EDM = ["--algo", "edm", "--iters", "2", "--batch", "16", "--eval-samples", "16", "--ckpt-every", "2",
       "--log-every", "1"]


def launch(script, args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


def tree(folder):
    """{relative path: sha256} of every file under `folder` (folders included, as None)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), folder)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def error_message(p, script):
    """The parser's message (after `train.py: error: `), not the usage line above it, which names every flag."""
    prefix = f"{script}: error: "
    assert p.returncode == 2 and prefix in p.stderr, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    assert "iter " not in p.stdout, "training started:\n" + p.stdout
    return p.stderr.split(prefix, 1)[1]


def assert_refused(p, *names, script="train.py"):
    message = error_message(p, script)
    for name in names:
        assert str(name) in message, f"{name!r} not named in: {message}"
    return message


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, workdir):
    """Finished runs: cd on ring8 (the one most cases aim at), mcm S = 2 on two_modes, and an edm teacher."""
    base = tmp_path_factory.mktemp("finished")
    out = {}
    for name, args in (("cd", FINISHED), ("mcm", MCM), ("edm", EDM)):
        out[name] = base / name
        p = launch("train.py", [*args, "--outdir", out[name]], workdir)
        assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(f.name for f in out["cd"].glob("ckpt-*.pt")) == ["ckpt-0000002.pt", "ckpt-0000004.pt"]
    return out


@pytest.fixture(scope="module")
def hashes(runs):
    return {name: tree(path) for name, path in runs.items()}


@pytest.fixture(autouse=True)
def nothing_changes(runs, hashes, workdir):
    yield
    for name, path in runs.items():
        assert tree(path) == hashes[name], f"the finished {name} run folder changed"
    assert not os.listdir(workdir), f"files written into the working folder: {os.listdir(workdir)}"


@pytest.fixture(scope="module")
def files(tmp_path_factory, runs):
    """Bad and good inputs: teachers of every kind, image sets of several sizes."""
    d = tmp_path_factory.mktemp("files")
    (d / "text.pt").write_text("these are not weights\n")
    torch.save([1, 2, 3], d / "list.pt")
    edm_ckpt = (runs["edm"] / "ckpt-0000002.pt").read_bytes()
    (d / "truncated.pt").write_bytes(edm_ckpt[: len(edm_ckpt) // 2])
    (d / "text.pkl").write_text("not a pickle either\n")
    torch.manual_seed(0)
    for name, label_dim in (("uncond8.pkl", 0), ("cond8.pkl", 10)):
        kwargs = dict(SONGUNET_CONFIGS["tiny-ddpmpp-8"], label_dim=label_dim)
        write_edm_pickle(d / name, SongUNet(**kwargs), kwargs, marker_src(d / "module_src_ran"))
    good = (d / "uncond8.pkl").read_bytes()
    (d / "truncated.pkl").write_bytes(good[: len(good) // 2])
    rng = np.random.default_rng(0)
    for res in (8, 12, 16):
        np.savez(d / f"rgb{res}.npz", x=rng.integers(0, 256, (16, res, res, 3), dtype=np.uint8))
    return d


# ------------------------------------------------------------------------------------------------ numbers
NUMBERS = [
    (["--iters", "0"], "--iters"),             # 0 is a value, never "the default"
    (["--iters", "a"], "--iters"),
    (["--batch", "0"], "--batch"),
    (["--batch", "-4"], "--batch"),
    (["--batch-gpu", "-1"], "--batch-gpu"),
    (["--log-every", "0"], "--log-every"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--max-skips", "0"], "--max-skips"),
    (["--ckpt-every", "-1"], "--ckpt-every"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--ema-halflife", "-100"], "--ema-halflife"),
    (["--ema-rampup", "1.5"], "--ema-rampup"),
    (["--mu", "1"], "--mu"),                   # μ ∈ [0, 1)
    (["--algo", "ctm", "--gamma", "2"], "--gamma"),  # γ ∈ [0, 1]
    (["--algo", "ctm", "--gamma", "nan"], "--gamma"),
    (["--data", "digits", "--dropout", "1"], "--dropout"),  # dropout ∈ [0, 1)
    (["--data", "digits", "--fid", "-1"], "--fid"),
    (["--data", "digits", "--workers", "-1"], "--workers"),
]


class TestNumbersAreCheckedWhenParsed:
    @pytest.mark.parametrize("args, flag", NUMBERS, ids=[" ".join(a) for a, _ in NUMBERS])
    def test_refused(self, tmp_path, workdir, args, flag):
        p = launch("train.py", ["--algo", "cd", *args, "--outdir", tmp_path / "new"], workdir)
        assert_refused(p, flag)
        assert not (tmp_path / "new").exists()


STEPS = ["a", "0", "-2", "2,2"]


class TestStudentStepsAreDistinctPositiveIntegers:
    @pytest.mark.parametrize("S", STEPS, ids=[repr(s) for s in STEPS])
    def test_refused(self, tmp_path, workdir, S):
        p = launch("train.py", ["--algo", "mcm", f"--student-steps={S}", "--outdir", tmp_path / "new"], workdir)
        assert_refused(p, "--student-steps")
        assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------- flags that do not apply
NOT_HERE = [
    (["--algo", "cd", "--xflip"], "--xflip"),                                  # toys: no images to flip
    (["--algo", "cd", "--fid", "10"], "--fid"),
    (["--algo", "cd", "--arch", "tiny-ddpmpp-8"], "--arch"),
    (["--algo", "cd", "--workers", "2"], "--workers"),
    (["--algo", "cd", "--ct"], "--ct"),                                        # consistency training is MCM's
    (["--algo", "cd", "--gamma", "0.5"], "--gamma"),                         # ctm's flag on cd
    (["--algo", "mcm", "--ct", "--teacher", "{files}/uncond8.pkl"], ("--ct", "--teacher")),  # CT has no teacher
    (["--algo", "cd", "--data", "npz:{files}/rgb8.npz", "--cond"], "--cond"),  # no labels in the file
    (["--algo", "cd", "--data", "npz:{files}/rgb8.npz", "--teacher", "{files}/uncond8.pkl",
      "--arch", "tiny-ddpmpp-8"], "--arch"),                                   # the .pkl fixes the architecture
]


class TestFlagsThatDoNotApplyAreRefused:
    @pytest.mark.parametrize("args, flag", NOT_HERE, ids=[" ".join(a[2:] or a) for a, _ in NOT_HERE])
    def test_refused(self, tmp_path, workdir, files, args, flag):
        args = [a.format(files=files) for a in args]
        p = launch("train.py", [*args, "--outdir", tmp_path / "new"], workdir)
        assert_refused(p, *((flag,) if isinstance(flag, str) else flag))
        assert not (tmp_path / "new").exists()
        assert not (files / "module_src_ran").exists()


# ------------------------------------------------------------------------------------------------ teachers and data
TEACHERS = [
    ("text.pt", "ring8"), ("list.pt", "ring8"), ("truncated.pt", "ring8"), ("missing.pt", "ring8"),
    ("text.pkl", "npz:{files}/rgb8.npz"), ("truncated.pkl", "npz:{files}/rgb8.npz"),
    ("uncond8.pkl", "npz:{files}/rgb16.npz"),  # an 8x8 teacher for 16x16 images
]


class TestUnreadableOrForeignTeachersAreRefused:
    @pytest.mark.parametrize("name, data", TEACHERS, ids=[f"{t} for {d.split('/')[-1]}" for t, d in TEACHERS])
    def test_refused(self, tmp_path, workdir, files, name, data):
        path = files / name
        p = launch("train.py", ["--algo", "cd", "--data", data.format(files=files), "--teacher", path,
                                "--outdir", tmp_path / "new"], workdir)
        assert_refused(p, f"--teacher {path}")
        assert not (tmp_path / "new").exists()
        assert not (files / "module_src_ran").exists()

    def test_a_teacher_trained_on_other_data(self, tmp_path, workdir, runs):
        teacher = runs["edm"] / "ckpt-0000002.pt"  # an edm run on ring8
        p = launch("train.py", ["--algo", "cd", "--data", "spiral", "--teacher", teacher,
                                "--outdir", tmp_path / "new"], workdir)
        message = assert_refused(p, f"--teacher {teacher}", "ring8", "spiral")
        assert "trained on" in message
        assert not (tmp_path / "new").exists()


class TestImagesWithoutADefaultArchitecture:
    def test_refused(self, tmp_path, workdir, files):
        p = launch("train.py", ["--algo", "edm", "--data", f"npz:{files}/rgb12.npz", "--outdir", tmp_path / "new"],
                   workdir)
        assert_refused(p, "--data", "12x12", "--arch")
        assert not (tmp_path / "new").exists()


class TestOutdirMustBeAWritableFolder:
    def test_a_file(self, tmp_path, workdir):
        (tmp_path / "file").write_text("x")
        p = launch("train.py", ["--algo", "cd", "--outdir", tmp_path / "file"], workdir)
        assert_refused(p, f"--outdir {tmp_path / 'file'}")
        assert (tmp_path / "file").read_text() == "x"

    def test_below_a_file(self, tmp_path, workdir):
        (tmp_path / "file").write_text("x")
        p = launch("train.py", ["--algo", "cd", "--outdir", tmp_path / "file" / "run"], workdir)
        assert_refused(p, "--outdir")

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
    def test_read_only(self, tmp_path, workdir):
        (tmp_path / "ro").mkdir(mode=0o555)
        p = launch("train.py", ["--algo", "cd", "--outdir", tmp_path / "ro" / "run"], workdir)
        assert_refused(p, "--outdir")
        assert not os.listdir(tmp_path / "ro")


# ------------------------------------------------------------------------------------------------ run folders
class TestAFinishedRunIsNeverOverwritten:
    @pytest.mark.parametrize("change", [[], ["--iters", "2"], ["--algo", "edm"]],
                             ids=["same command", "shorter run", "other algorithm"])
    def test_rerun_without_resume(self, workdir, runs, change):
        p = launch("train.py", [*FINISHED, *change, "--outdir", runs["cd"]], workdir)
        assert_refused(p, f"--outdir {runs['cd']}", "--resume")

    @pytest.mark.parametrize("name", ["args.json", "ckpt-0000004.pt", "stats.jsonl"])
    def test_a_folder_holding_any_trace_of_a_run(self, tmp_path, workdir, runs, name):
        d = tmp_path / "run"
        d.mkdir()
        shutil.copy(runs["cd"] / name, d / name)
        before = tree(d)
        p = launch("train.py", [*FINISHED, "--outdir", d], workdir)
        assert_refused(p, f"--outdir {d}", "--resume")
        assert tree(d) == before


class TestResumeNeedsACheckpoint:
    @pytest.mark.parametrize("content", [[], ["args.json", "stats.jsonl"]], ids=["empty", "no ckpt"])
    def test_refused(self, tmp_path, workdir, runs, content):
        d = tmp_path / "run"
        d.mkdir()
        for name in content:
            shutil.copy(runs["cd"] / name, d / name)
        before = tree(d)
        p = launch("train.py", [*FINISHED, "--outdir", d, "--resume"], workdir)
        assert_refused(p, "--resume", "no checkpoint", str(d))
        assert tree(d) == before


# One case per family of settings that alter a run: what is trained, on what, from which teacher, how
# (optimisation and precision), the algorithm's own settings, the network, and the evaluation EMA.
CHANGED = [
    ("cd", ["--algo", "ctm"], ["--algo"]),
    ("cd", ["--data", "spiral"], ["--data"]),
    ("cd", ["--cond"], ["--cond"]),
    ("cd", ["--teacher", "{edm}/ckpt-0000002.pt"], ["--teacher"]),
    ("cd", ["--batch", "32"], ["--batch"]),
    ("cd", ["--lr", "0.002"], ["--lr"]),
    ("cd", ["--precision", "bf16"], ["--precision"]),
    ("cd", ["--precond", "analytic", "--distance", "l2"], ["--precond", "--distance"]),
    ("cd", ["--mu", "0.5"], ["--mu"]),
    ("cd", ["--ema-halflife", "1000"], ["--ema-halflife"]),
    ("cd", ["--seed", "3", "--lr", "0.01"], ["--seed", "--lr"]),  # every difference is named
    ("mcm", ["--student-steps", "4"], ["--student-steps"]),
    ("mcm", ["--ct"], ["--ct"]),
    ("mcm", ["--algo", "edm"], ["--algo"]),  # edm takes no --student-steps: it is left out below
]


class TestResumeRefusesChangedSettings:
    @pytest.mark.parametrize("run, change, flags", CHANGED, ids=[f"{r}: {' '.join(c[:2])}" for r, c, _ in CHANGED])
    def test_refused(self, workdir, runs, run, change, flags):
        args = {"cd": FINISHED, "mcm": MCM}[run]
        if change == ["--algo", "edm"]:
            i = args.index("--student-steps")
            args = args[:i] + args[i + 2:]
        change = [c.format(edm=runs["edm"]) for c in change]
        p = launch("train.py", [*args, "--outdir", runs[run], "--resume", *change], workdir)
        message = assert_refused(p, "--resume", *flags)
        assert "different settings" in message


# ------------------------------------------------------------------------------------------------ allowed on resume
def jsonl(path):
    def strict(constant):
        raise ValueError(f"{constant} is not JSON")
    return [json.loads(line, parse_constant=strict) for line in path.read_text().splitlines()]


class TestResumeAllowsChangesThatDoNotAlterTheRun:
    def test_more_iterations_continue_the_run(self, tmp_path, workdir, runs):
        d = tmp_path / "run"
        shutil.copytree(runs["cd"], d)
        before = jsonl(d / "stats.jsonl")
        p = launch("train.py", [*FINISHED, "--iters", "6", "--outdir", d, "--resume"], workdir)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "resumed from" in p.stdout and "ckpt-0000004.pt" in p.stdout
        assert "iter      6/6" in p.stdout
        assert torch.load(d / "ckpt-0000006.pt", weights_only=True)["step"] == 6
        stats = jsonl(d / "stats.jsonl")
        assert [s["iter"] for s in stats] == [2, 4, 6]
        assert stats[:2] == before  # the first run's lines kept as they were
        assert stats[2]["time"] >= stats[1]["time"]  # time continues from the saved elapsed time

    def test_logging_checkpoint_and_evaluation_settings_may_change(self, tmp_path, workdir, runs):
        d = tmp_path / "run"
        shutil.copytree(runs["cd"], d)
        p = launch("train.py", [*FINISHED, "--iters", "6", "--log-every", "1", "--ckpt-every", "3",
                                "--eval-samples", "32", "--max-skips", "5", "--batch-gpu", "8",
                                "--outdir", d, "--resume"], workdir)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "resumed from" in p.stdout and "iter      5/6" in p.stdout
        assert [s["iter"] for s in jsonl(d / "stats.jsonl")] == [2, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ generate.py
GENERATE = [
    (["--network", "{tmp}/missing"], "--network"),
    (["--network", "{files}/text.pkl"], "--network"),
    (["--network", "{cd}", "--seeds", "5-2"], "--seeds"),
    (["--network", "{cd}", "--seeds", "x"], "--seeds"),
    (["--network", "{cd}", "--class", "0"], "--class"),              # an unconditional network
    (["--network", "{files}/cond8.pkl", "--class", "10"], "--class"),  # 10 classes: 0..9
    (["--network", "{files}/cond8.pkl", "--class", "-1"], "--class"),
    (["--network", "{cd}", "--batch", "0"], "--batch"),
    (["--network", "{cd}", "--nfe", "0"], "--nfe"),
]


class TestGenerateRefusesBadInput:
    @pytest.mark.parametrize("args, flag", GENERATE, ids=[" ".join(a).replace("{", "").replace("}", "")
                                                         for a, _ in GENERATE])
    def test_refused(self, tmp_path, workdir, runs, files, args, flag):
        args = [a.format(tmp=tmp_path, files=files, cd=runs["cd"]) for a in args]
        seeds = ["--seeds", "0-3"] * ("--seeds" not in args)
        p = launch("generate.py", [*args, "--outdir", tmp_path / "out", *seeds], workdir)
        message = assert_refused(p, flag, script="generate.py")
        if flag == "--network":
            assert args[1] in message
        assert not (tmp_path / "out").exists()
        assert not (files / "module_src_ran").exists()
