"""The fork server (pipeline.forkserver): a `python -m stages.<kind>` process hands its stage to a fork of
a server that has the heavy packages imported, and is, to whoever started it, the stage process itself:
its arguments, directory, environment, umask, standard streams and exit status, the signals sent to it,
and the checkout's code as it is now."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import forkserver

ROOT = Path(__file__).resolve().parents[1]
PROBE = '''
import json, os, signal, sys, time
from pathlib import Path

VERSION = 1
out = Path(sys.argv[1])
if len(sys.argv) > 3 and sys.argv[3] == "wait":
    signal.signal(signal.SIGTERM, lambda n, f: (Path(str(out) + ".term").write_text("1"), sys.exit(7)))
out.write_text(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv, "version": VERSION,
                           "env": os.environ.get("PROBE_VALUE"), "umask": os.umask(0o022),
                           "stdin": sys.stdin.readline().strip() if sys.argv[2] == "stdin" else None,
                           "main": __name__, "path0": sys.path[0]}))
print("to stdout")
print("to stderr", file=sys.stderr)
if len(sys.argv) > 3 and sys.argv[3] == "wait":
    time.sleep(60)
raise SystemExit(int(sys.argv[2]) if sys.argv[2].isdigit() else 0)
'''


pytestmark = pytest.mark.e2e(cost=5)


@pytest.fixture(scope="module")
def sockets() -> Iterator[Path]:
    """This module's socket folder (XDG_RUNTIME_DIR: a short path, as a socket's must be): its tests share
    one server, and no other test's; stopped at the end."""
    folder = Path(tempfile.mkdtemp(prefix="jfs"))
    try:
        yield folder
    finally:
        for lock in folder.glob("*/*.lock"):
            for pid in _servers(lock.with_suffix(".sock")):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def checkout(tmp_path: Path, sockets: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the checkout's stages and pipeline packages with a probe stage, and the environment
    of its stage processes."""
    for package in ("stages", "pipeline"):
        (tmp_path / package).mkdir()
        for source in (ROOT / package).glob("*.py"):
            shutil.copy2(source, tmp_path / package / source.name)
    (tmp_path / "stages" / "probe.py").write_text(PROBE)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(sockets), "PROBE_VALUE": "from the caller"}
    env.pop(forkserver.SWITCH, None)
    return tmp_path, env


def _servers(sock: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if str(sock).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


def _stage(work: Path, env: dict[str, str], *args: str, stdin: str = "", umask: int = 0o022
           ) -> tuple[int, int, str, str, dict]:
    """Run the probe stage: its caller's pid, exit status, stdout, stderr, and what the stage saw."""
    out = work / "probe.json"
    proc = subprocess.Popen([sys.executable, "-m", "stages.probe", str(out), *args], cwd=work, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            umask=umask)
    stdout, stderr = proc.communicate(stdin, timeout=120)
    return proc.pid, proc.returncode, stdout, stderr, json.loads(out.read_text())


def _served(work: Path, env: dict[str, str]) -> None:
    """Until a stage is served by a fork (the first one starts the server and runs as a plain process)."""
    deadline = time.time() + 120
    while True:
        proc = subprocess.Popen([sys.executable, "-m", "stages.probe", str(work / "probe.json"), "0"], cwd=work,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.wait(timeout=120)
        if json.loads((work / "probe.json").read_text())["pid"] != proc.pid:
            return
        assert time.time() < deadline, "no stage was served by the fork server within 120 s"
        time.sleep(1)


def test_a_served_stage_is_the_process_its_caller_started(checkout: tuple[Path, dict[str, str]]):
    work, env = checkout
    _served(work, env)
    pid, code, stdout, stderr, seen = _stage(work, env, "stdin", "extra", stdin="a line for the stage\n",
                                             umask=0o027)
    assert seen["pid"] != pid and code == 0, stderr  # a fork of the server ran the stage
    assert seen["cwd"] == str(work) and seen["path0"] == str(work)  # python -m: the directory comes first
    assert seen["argv"] == [str(work / "stages" / "probe.py"), str(work / "probe.json"), "stdin", "extra"]
    assert seen["env"] == "from the caller" and seen["umask"] == 0o027 and seen["main"] == "__main__"
    assert seen["stdin"] == "a line for the stage"
    assert (stdout, stderr) == ("to stdout\n", "to stderr\n")

    pid, code, _, stderr, seen = _stage(work, env, "3")
    assert seen["pid"] != pid and code == 3 and stderr == "to stderr\n"


def test_a_served_stage_runs_the_code_as_it_is_now(checkout: tuple[Path, dict[str, str]]):
    work, env = checkout
    _served(work, env)
    *_, before = _stage(work, env, "0")
    probe = work / "stages" / "probe.py"
    probe.write_text(probe.read_text().replace("VERSION = 1", "VERSION = 2"))
    pid, *_, after = _stage(work, env, "0")
    assert after["pid"] != pid and (before["version"], after["version"]) == (1, 2)


def test_signals_reach_the_stage_and_a_killed_caller_takes_it_along(checkout: tuple[Path, dict[str, str]]):
    work, env = checkout
    _served(work, env)
    out = work / "probe.json"
    for sent in (signal.SIGTERM, signal.SIGKILL):
        out.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "stages.probe", str(out), "x", "wait"], cwd=work, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not out.exists() or not out.read_text():
            assert time.time() < deadline and proc.poll() is None, "the stage did not start"
            time.sleep(0.05)
        worker = json.loads(out.read_text())["pid"]
        assert worker != proc.pid  # a fork of the server
        if sent == signal.SIGTERM:  # Ctrl-Z stops the stage with its caller; fg (SIGCONT) resumes both
            proc.send_signal(signal.SIGTSTP)
            _until_stopped((worker, proc.pid), True, "Ctrl-Z did not stop both")
            proc.send_signal(signal.SIGCONT)
            _until_stopped((worker, proc.pid), False, "SIGCONT did not resume both")
        proc.send_signal(sent)
        code = proc.wait(timeout=30)
        deadline = time.time() + 10
        while Path(f"/proc/{worker}").exists() and _state(worker) != "Z":
            assert time.time() < deadline, f"the stage outlived its caller's {sent.name}"
            time.sleep(0.05)
        if sent == signal.SIGTERM:  # the stage's own handler ran, and its status is the caller's
            assert Path(f"{out}.term").exists() and code == 7
        else:
            assert code == -signal.SIGKILL


def _until_stopped(pids: tuple[int, ...], stopped: bool, failure: str) -> None:
    """Until every one of ``pids`` is stopped (state T), or none is."""
    deadline = time.time() + 10
    while any((_state(pid) == "T") != stopped for pid in pids):
        assert time.time() < deadline, failure
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_switched_off_another_environment_or_interpreter_options_run_the_stage_itself(
        checkout: tuple[Path, dict[str, str]]):
    work, env = checkout
    _served(work, env)
    off = {**env, forkserver.SWITCH: "0"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.probe", str(work / "probe.json"), "0"], cwd=work, env=off,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait(timeout=120)
    assert json.loads((work / "probe.json").read_text())["pid"] == proc.pid
    sockets = sorted((Path(env["XDG_RUNTIME_DIR"]) / f"jem-stages-{os.getuid()}").glob("*.sock"))
    assert len(sockets) == 1
    other = {**env, "OMP_NUM_THREADS": "1" if env.get("OMP_NUM_THREADS") != "1" else "2"}  # shapes torch's import
    proc = subprocess.Popen([sys.executable, "-m", "stages.probe", str(work / "probe.json"), "0"], cwd=work,
                            env=other, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait(timeout=120)
    assert json.loads((work / "probe.json").read_text())["pid"] == proc.pid  # no server of its own yet
    options = subprocess.Popen([sys.executable, "-X", "dev", "-m", "stages.probe", str(work / "probe.json"), "0"],
                               cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options.wait(timeout=120)  # an interpreter with options of its own runs its stage itself
    assert json.loads((work / "probe.json").read_text())["pid"] == options.pid
