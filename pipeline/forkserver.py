"""Stage processes that start with torch and MLflow already imported: a fork server.

Every stage DVC runs is a new ``python -m stages.<kind>`` process, and before any work it imports
torch, torchvision, MLflow with its SQLAlchemy store, matplotlib and foolbox: 4-5 s of CPU on 2 cores,
paid by each of the demo's 33 stages and by every stage the test suite runs, while most non-training
stages do a second or less of their own work. So the process DVC starts hands its stage to a server
that has imported those packages once, and forks a copy of itself for each stage:

- ``stages/__init__.py`` calls ``handoff()`` when Python runs ``python -m stages.<kind>`` (and only
  then: importing a stage module does not). It connects to the server of this interpreter and
  environment (a Unix socket in ``<runtime dir>/jem-stages-<uid>/``, the folder the user's alone),
  sends its arguments, working directory, environment and umask, and its standard streams themselves
  (the descriptors, so the stage writes where DVC reads); passes on the signals it gets (Ctrl-C,
  SIGTERM, ...; Ctrl-Z stops the stage with it, ``fg`` resumes both); and ends the way the stage ended:
  its exit status, or killed by its signal.
- The server, started in the background by the first stage that finds none (that stage runs as a
  plain process meanwhile), imports ``PRELOAD`` and nothing of this project, then for each stage forks
  a *monitor*, which forks the *worker*. The worker takes the caller's streams, directory,
  environment and arguments, forgets every module of ``jem``, ``pipeline`` and ``stages`` (it imports
  the checkout's code as it is now, as a fresh process would), draws new random seeds and runs the
  stage module as ``__main__``. The monitor passes signals on, kills the worker (SIGKILL) when the
  caller goes away (a SIGKILL leaves the caller no handler), and sends back how the worker ended.
- A server serves one environment: the key of its socket hashes the interpreter, this file and the
  environment variables that shape what its imports do (``SHAPING``), so ``OMP_NUM_THREADS`` or
  ``PYTHONPATH`` set differently gets a server of its own. It exits after ``IDLE_S`` seconds without a
  stage.

Off with ``JEM_FORKSERVER=0``, and off where it cannot be what a plain process is: outside Linux, for
an interpreter started with options of its own (``python -X ... -m``), and for torchrun's workers.
Nothing here is imported by a stage's own code; the module imports only the standard library.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import io
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

SWITCH = "JEM_FORKSERVER"
IDLE_S = 60.0  # the server exits after this long without a stage
# What the server imports once: the heavy packages the stages import (jem imports them where used).
PRELOAD = ("numpy", "yaml", "filelock", "torch", "torchvision", "scipy.linalg", "PIL.Image", "matplotlib.figure",
           "matplotlib.backends.backend_agg", "foolbox", "mlflow", "mlflow.tracking",
           "mlflow.store.tracking.sqlalchemy_store", "tqdm")
OWN = frozenset({"jem", "pipeline", "stages"})  # this project's packages: a worker imports them afresh
# The environment variables that shape what the server's imports do (the interpreter's, the thread pools',
# the dynamic loader's, torch's, matplotlib's configuration and cache folders, the locale, the temporary
# folder): a server serves callers that agree on all of them. The rest (DVC's, MLflow's, SLURM's, PATH,
# this project's) is read while a stage runs, by which time the worker has the caller's whole environment.
SHAPING = ("PYTHON", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "GOTO", "BLIS_", "NUMEXPR_", "LD_", "MALLOC_",
           "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_", "TRITON_", "MPL", "MATPLOTLIB", "HOME", "XDG_CONFIG_HOME",
           "XDG_CACHE_HOME", "TMPDIR", "TEMP", "TMP", "LANG", "LC_", "LANGUAGE", "TZ")
TORCHRUN = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")  # a worker of torchrun: it watches that process itself
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STARTED = "JEM_PROCESS_START"  # "<pid>:<epoch seconds>": when the caller of worker <pid> started


# ---- the caller: the process DVC started -------------------------------------------------------
def handoff() -> None:
    """Run this ``python -m stages.<kind>`` process's stage in a fork of the server and exit as it did;
    returns, doing nothing, where the stage should run here (see the module's docstring)."""
    module = _requested_module()
    if module is None:
        return
    folder = _runtime_dir()
    if folder is None:
        return
    path = folder / f"{_key()}.sock"
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        if not path.with_suffix(".refused").exists():
            _start_server(path)  # for the stages after this one
        return
    with conn:
        request = {"module": module, "argv": sys.orig_argv[3:], "cwd": os.getcwd(), "env": dict(os.environ),
                   "umask": _umask(), "started": time.time() - (process_age() or 0.0)}
        try:
            payload = json.dumps(request).encode()
            socket.send_fds(conn, [struct.pack("!Q", len(payload)) + payload], [0, 1, 2])
            reader = conn.makefile("rb")
            first = reader.readline()
        except OSError:
            first = b""
        if not first.startswith(b"pid "):  # the server went away before forking: run the stage here
            return
        for signum in FORWARDED:
            signal.signal(signum, lambda n, _frame: _tell(conn, f"signal {n}\n"))

        def suspend(_n: int, _frame: Any) -> None:  # Ctrl-Z: the stage stops too (SIGSTOP: its process group
            _tell(conn, f"signal {int(signal.SIGSTOP)}\n")  # is the server's, where the kernel drops SIGTSTP)
            os.kill(os.getpid(), signal.SIGSTOP)

        signal.signal(signal.SIGTSTP, suspend)
        signal.signal(signal.SIGCONT, lambda _n, _frame: _tell(conn, f"signal {int(signal.SIGCONT)}\n"))
        line = reader.readline()
    _end_like(line)


def _requested_module() -> str | None:
    """``stages.<kind>`` when this process is ``python -m stages.<kind> ...`` with no interpreter options
    and the fork server applies; else None."""
    argv = getattr(sys, "orig_argv", [])
    if (len(argv) < 3 or argv[1] != "-m" or not argv[2].startswith("stages.") or sys.argv[:1] != ["-m"]
            or not sys.platform.startswith("linux") or os.environ.get(SWITCH, "1") == "0"
            or any(name in os.environ for name in TORCHRUN) or not hasattr(socket, "send_fds")):
        return None
    return argv[2]


def _runtime_dir() -> Path | None:
    """This user's folder for the servers' sockets (created 0700); None where it is not only theirs."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = Path(base) / f"jem-stages-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()  # the folder itself, not what a symbolic link there points to
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return folder


def _key() -> str:
    """The server's name: the interpreter, this file and the environment that shapes what it imports."""
    env = {k: v for k, v in os.environ.items() if k.startswith(SHAPING)}
    digest = hashlib.sha256()
    digest.update(json.dumps([sys.executable, sys.version, sorted(env.items())]).encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:24]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_age() -> float | None:
    """Seconds since this process started: by the operating system's record of its start (so the
    interpreter's start-up and every import count), or, in a worker, since its caller started. None
    where the system does not say."""
    forked_pid, _, started = os.environ.get(STARTED, "").partition(":")
    if forked_pid == str(os.getpid()):
        return max(0.0, time.time() - float(started))
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _tell(conn: socket.socket, message: str) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(message.encode())


def _end_like(line: bytes) -> NoReturn:
    """Exit as the worker did: ``exit <status>`` or ``signal <n>`` (anything else: the server died)."""
    word, _, value = line.decode(errors="replace").strip().partition(" ")
    if word == "signal" and value.isdigit():
        signum = int(value)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    if word == "exit" and value.lstrip("-").isdigit():
        os._exit(int(value) & 0xFF)
    print("error: the stage's fork server ended before the stage did; rerun it (JEM_FORKSERVER=0 runs "
          "stages without it)", file=sys.stderr)
    os._exit(1)


def _start_server(path: Path) -> None:
    """The server for ``path``, in the background, in a session of its own (no terminal, nobody's
    streams): the interpreter and environment of this process, the checkout's copy of this module."""
    root = str(Path(__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {root!r}); from pipeline.forkserver import serve; serve({str(path)!r})"
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-c", code], cwd="/", stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


# ---- the server ---------------------------------------------------------------------------------
def serve(path: str) -> None:
    """Serve stages on the Unix socket ``path`` until IDLE_S seconds pass without one."""
    base_path = [p for p in sys.path[1:] if p != ""]  # what follows "-c"'s entry and the checkout's
    sock_path = Path(path)
    with open(sock_path.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another server has it
        for name in PRELOAD:
            with contextlib.suppress(Exception):
                __import__(name)
        if threading.active_count() != 1:  # a fork would lose a thread that may hold a lock
            sock_path.with_suffix(".refused").write_text(f"threads after the imports: {threading.enumerate()}\n")
            return
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()  # left by a server that was killed
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(64)
        listener.settimeout(1.0)
        live: set[int] = set()
        idle_since = time.monotonic()
        try:
            while live or time.monotonic() - idle_since < IDLE_S:
                idle_since = _reap(live, idle_since)
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                if not _same_user(conn):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    lock.close()  # the next server's, once this one exits, whatever its stages do
                    _monitor(conn, base_path)
                conn.close()
                live.add(pid)
        finally:
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()
            listener.close()


def _reap(live: set[int], idle_since: float) -> float:
    """Drop the monitors that have ended from ``live``; returns when the server last became idle."""
    for pid in list(live):
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
        live.discard(pid)
        idle_since = time.monotonic()
    return idle_since


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _monitor(conn: socket.socket, base_path: list[str]) -> NoReturn:
    """One stage: fork the worker, pass signals on, kill it if the caller goes, report how it ended."""
    try:
        conn.settimeout(None)  # blocking, whatever the listener's timeout
        request, fds = _receive(conn)
        monitor = os.getpid()
        worker = os.fork()
        if worker == 0:
            conn.close()
            _die_with(monitor)
            _work(request, fds, base_path)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"pid {worker}\n".encode())
        try:
            ended: int | None = os.pidfd_open(worker)  # readable once the worker has ended
        except (OSError, AttributeError):  # Linux before 5.3: ask every 50 ms instead
            ended = None
        watched, wait = ([conn], 0.05) if ended is None else ([conn, ended], None)
        pending = b""
        while True:
            ready, _, _ = select.select(watched, [], [], wait)
            if ended in ready or (ended is None and _has_ended(worker)):
                break
            if conn not in ready:
                continue
            data = conn.recv(4096)
            if not data:  # the caller is gone (killed): so goes its stage
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                word, _, value = line.decode().partition(" ")
                if word == "signal" and value.isdigit():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker, int(value))
        _, status = os.waitpid(worker, 0)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            conn.sendall((f"signal {-code}\n" if code < 0 else f"exit {code}\n").encode())
    finally:
        os._exit(0)


def _die_with(parent: int) -> None:
    """Have Linux kill this process (SIGKILL) when ``parent``, its monitor, ends: a stage never outlives
    the process that reports it to its caller."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


def _has_ended(pid: int) -> bool:
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(fds) != 3 or len(data) < 8:
        raise OSError("a request without its three streams")
    size = struct.unpack("!Q", data[:8])[0]
    body = data[8:]
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise OSError("a request cut short")
        body += more
    return json.loads(body), fds


def _work(request: dict[str, Any], fds: list[int], base_path: list[str]) -> NoReturn:
    """Become the stage process the caller would have been, and run the stage."""
    for signum in (*FORWARDED, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python sets them up at start
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[STARTED] = f"{os.getpid()}:{request['started']}"  # the caller's start: start-up timings
    _new_streams()
    for name in [m for m in sys.modules if m.split(".")[0] in OWN]:
        del sys.modules[name]
    sys.path[:] = [request["cwd"], *base_path]  # python -m: the working directory first
    sys.argv = ["<forked>", *request["argv"]]  # runpy puts the module's file first
    _reseed()
    code: Any = 0
    try:
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        finish(None)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    finish(code)


def finish(code: int | None) -> None:
    """What a normal exit does (threads joined, exit handlers, streams flushed), then exit with ``code``."""
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    if code is not None:
        os._exit(code & 0xFF)


def _new_streams() -> None:
    """sys.stdin/stdout/stderr on the caller's descriptors, buffered as Python buffers them at start."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    encoding = os.environ.get("PYTHONIOENCODING", "").split(":")[0] or sys.stdout.encoding or "utf-8"
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                 encoding=encoding)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        raw = io.FileIO(fd, "w", closefd=False)
        stream = io.TextIOWrapper(io.BufferedWriter(raw), encoding=encoding,
                                  errors="backslashreplace" if fd == 2 else "strict",
                                  line_buffering=fd == 2 or raw.isatty(), write_through=unbuffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _reseed() -> None:
    """Fresh seeds for the generators a new process seeds from the system (the fork shares the server's)."""
    import random

    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
