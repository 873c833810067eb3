"""The parts of scripts/gpu_check.sh that are Python (run by it; see its header for the whole check).

    python scripts/gpu_check.py env --device cuda --out DIR          # device, torch, packages: env.json
    python scripts/gpu_check.py smoke --device cuda --size paper --out DIR [--from-workspace PATH]
    python scripts/gpu_check.py smoke-fid --device cuda --size paper --out DIR
    python scripts/gpu_check.py bn --size paper --out DIR
    python scripts/gpu_check.py profile --device cuda --size paper --out DIR
    python scripts/gpu_check.py summary --device cuda --size paper --out DIR [--final]
    python scripts/gpu_check.py merge-report DIR/performance.md reports/performance.md
    python scripts/gpu_check.py wheels --dest .whl                   # the wheels the device machine needs

Each part writes ``<part>.json`` into ``--out`` and, when it fails, ends with one line
``error: <reason>`` and exit status 1 (the summary quotes that line).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANT, SEED = "sadajem_k5", 1
SMOKE_STAGES = ("train", "sample", "evaluate", "fid", "robustness")
PARTS = ("env", "bench", "fid", "smoke", "smoke-fid", "bn", "profile")

# Issue 35's targets, measured against, not assumed.
SPEEDUP_TARGETS = {"sadajem_k5": 3.0, "jempp_m10": 3.0, "jem_k20": 2.5}  # fast vs the reference loop
SADA_MS_TARGET = 80.0  # ms per iteration of sadajem_k5's fast paths, on an H100
FID_50K_TARGET_S = 12.0  # Inception pass + statistics + Frechet distance of 50,000 samples
BN_POINTS = 1.0  # eval-mode accuracy vs accuracy with re-estimated batch-norm statistics, in points

# What a paper-scale smoke run changes in params.yaml: the paper scale (WRN-28-10, the papers' batches
# and sampler, run.perf auto) on procedural CIFAR-10-shaped sets, counts cut to minutes.
SMOKE_DATASETS = {
    "cifar10": {"source": "shapes", "num_classes": 10, "train": 12800, "val": 1000, "test": 2000, "interp": 1000,
                "seed": 0},
    "cifar100": {"source": "glyphs", "num_classes": 10, "train": 1000, "val": 100, "test": 1000, "seed": 1},
    "svhn": {"source": "clouds", "test": 1000, "seed": 2},
    "celeba": {"source": "gratings", "test": 1000, "seed": 3},
}
SMOKE_PAPER_SCALE = {
    # 12,800 / 128 = 100 iterations an epoch, 3 epochs: 300 iterations; the lr warms up over 100 and
    # decays at 80 % and 90 % of the run (as the demo), so it ends at a small lr as the papers' runs do
    "variant": {"train": {"epochs": 3, "log_every": 25, "checkpoint_every": 50},
                "optim": {"warmup_iters": 100, "milestones": [2.4, 2.7]}},
    "sample": {"buffer": 2000, "fresh": 1000, "per_class": 10},
    "evaluate": {"ood_max": 1000, "landscape": {"points": 5, "fraction": 0.05}},
    "fid": {"reference_max": 2000},
    "robustness": {"images": 200, "steps": 10, "linf": [2, 8], "l2": [0.5],
                   "bpda": {"images": 100, "epsilons": [8], "steps": 5, "purify_steps": 5, "chains": 2}},
}
KILL_AT = {"paper": 150, "tiny": 8}  # SIGKILL the training once a checkpoint of at least this step exists

# What `git ls-files -co --exclude-standard` leaves out, for a tree without .git (the device's copy).
SKIP_DIRS = {".git", ".venv", ".whl", ".gl", "__pycache__", ".pytest_cache", ".ruff_cache", ".import_linter_cache",
             "mlartifacts", "logs", ".slurm", "checkpoints", "data", "gmm", "fid_ref", "config", "models", "samples",
             "metrics", "plots", "dvc_plots", "gpu-check", "shared"}
SKIP_FILES = {"mlflow.db", ".mlflow.lock", "dvc.lock"}
PIPELINE_OUTPUTS = ("data/", "gmm/", "fid_ref/", "config/", "models/", "samples/", "metrics/", "plots/", "checkpoints/",
                    "dvc.lock")


def fail(message: str) -> int:
    print(f"error: {message}", flush=True)
    return 1


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


# ---- env ------------------------------------------------------------------------------------------------
def env(a: argparse.Namespace) -> int:
    """The device, torch and the versions of the packages the stages import; fails on a missing one."""
    import importlib.metadata as md
    import importlib.util
    import platform

    out = Path(a.out)
    info: dict[str, Any] = {"python": platform.python_version(), "git": shutil.which("git") is not None}
    if a.device.startswith("cuda"):
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            dev = torch.device(a.device)
            props = torch.cuda.get_device_properties(dev)
            info.update(device=torch.cuda.get_device_name(dev), capability=f"sm_{props.major}{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    else:  # the CPU rehearsal: torch's version without importing it (seconds of a rehearsal's start-up)
        info.update(torch=md.version("torch"), device="cpu")
    packages = {}
    missing = []
    for dist, module in (("dvc", "dvc"), ("mlflow", "mlflow"), ("foolbox", "foolbox"), ("pytorch-fid", "pytorch_fid"),
                         ("scipy", "scipy"), ("numpy", "numpy"), ("torchvision", "torchvision"), ("pyyaml", "yaml"),
                         ("pandas", "pandas"), ("matplotlib", "matplotlib"), ("scikit-learn", "sklearn")):
        try:
            packages[dist] = md.version(dist)
        except md.PackageNotFoundError:
            packages[dist] = None
        if importlib.util.find_spec(module) is None:
            missing.append(dist)
    info["packages"] = packages
    write_json(out / "env.json", info)
    print(json.dumps(info, indent=2))
    if a.device.startswith("cuda") and not info["cuda_available"]:
        return fail(f"--device {a.device} but torch {info['torch']} sees no CUDA device")
    if missing:
        return fail(f"not importable: {', '.join(missing)} (carry their wheels: scripts/gpu_check.sh's header)")
    return 0


# ---- the smoke workspace ----------------------------------------------------------------------------------
def copy_tree(src: Path, dest: Path, skip: tuple[Path, ...] = ()) -> int:
    """The files a fresh clone would have: ``git ls-files -co --exclude-standard`` where ``src`` is a git
    checkout, else every file but the pipeline's outputs, caches and virtualenvs (the device machine's copy
    of the tree has no .git); plus the Inception weights if they are there. The number of files copied."""
    files: list[str] = []
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=src, capture_output=True,
                                text=True, check=True).stdout.splitlines()
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=src, capture_output=True, text=True,
                             check=True).stdout.strip()
        if Path(top).resolve() != src.resolve():
            raise OSError("not the top of its own repository")
        files = [f for f in listed if not f.startswith(PIPELINE_OUTPUTS)]
    except (OSError, subprocess.CalledProcessError):
        for dirpath, dirnames, filenames in os.walk(src):
            rel = Path(dirpath).relative_to(src)
            dirnames[:] = [d for d in dirnames if not (
                (rel == Path(".") and d in SKIP_DIRS) or (rel == Path(".dvc") and d in ("cache", "tmp"))
                or d == "__pycache__" or d.endswith(".egg-info") or (Path(dirpath) / d).resolve() in skip)]
            files += [str(rel / f) for f in filenames if not (rel == Path(".") and f in SKIP_FILES)]
    files = [f for f in files if not (f.startswith("reports/") and f.count("/") > 1)]  # reports/<scale>/: outputs
    files += [str(p.relative_to(src)) for p in (src / "weights").glob("*.pth")]
    n = 0
    for rel in dict.fromkeys(files):
        s = src / rel
        if s.is_file() and not s.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dest / rel)
            n += 1
    return n


def copy_workspace(src: Path, dest: Path) -> None:
    """A private copy of a built workspace (tests/conftest.py's copy_workspace): read-only files (DVC's
    cache objects and the outputs linked to them, git's objects) hard-linked, everything else copied."""
    def link_or_copy(s: str, d: str) -> None:
        if os.stat(s).st_mode & 0o222:
            shutil.copy2(s, d)
        else:
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)

    shutil.copytree(src, dest, symlinks=True, copy_function=link_or_copy)


def smoke_params(params: dict[str, Any], size: str, device: str, keep: bool = False) -> dict[str, Any]:
    """params.yaml of the smoke workspace. ``paper``: scale paper, sadajem_k5 alone, procedural
    CIFAR-10-shaped sets and the counts of ``SMOKE_PAPER_SCALE``; ``tiny``: the tiny scale as the test suite
    runs it (``keep``: a built tiny workspace's own params, whose stages are then up to date)."""
    p = copy.deepcopy(params)
    p["run"] = {**(p.get("run") or {}), "device": device}  # run.*: no stage reruns for it
    if keep:
        return p
    p.update(scale=size, variants=[VARIANT], seeds=[SEED])
    if size == "paper":
        for role, spec in SMOKE_DATASETS.items():
            p["datasets"][role]["paper"] = dict(spec)
        p["scales"]["paper"] = deep_merge(p["scales"].get("paper") or {}, SMOKE_PAPER_SCALE)
    return p


def validate_params(params: dict[str, Any]) -> int:
    """The configure stage's own checks (the whole file, then every stage instance resolved): the number of
    stage instances. Raises the project's one-line ConfigError on a bad value."""
    from jem.config.instances import instances
    from jem.config.settings import validate_params as check

    check(params)
    return len(instances(params))


def _checkpoint_steps(folder: Path) -> list[int]:
    steps = []
    for path in folder.glob("step-*.pt"):
        m = re.fullmatch(r"step-0*(\d+)\.pt", path.name)
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def _kill_training(ws: Path) -> list[int]:
    """SIGKILL the ``stages.train`` processes running in ``ws`` (a crash, not a clean stop); their pids."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "stages.train" in cmdline and Path(os.readlink(proc / "cwd")).resolve() == ws.resolve():
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return killed


class _Streamed:
    """A command whose output goes to this process's stdout line by line (the part's log keeps what it printed
    even when the part is stopped at its time limit) and is kept for parsing."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
        import threading

        print(f"$ {' '.join(cmd)}", flush=True)
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace")
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    def wait(self) -> tuple[int, str, float]:
        rc = self.proc.wait()
        self.reader.join()
        return rc, "".join(self.lines), time.perf_counter() - self.start


def _run(cmd: list[str], cwd: Path, env: dict[str, str], log: list[str]) -> tuple[int, str, float]:
    rc, text, seconds = _Streamed(cmd, cwd, env).wait()
    log.append(text)
    return rc, text, seconds


def smoke(a: argparse.Namespace) -> int:
    """``dvc repro`` of sadajem_k5's stages in a copy of this tree, the training killed once mid-way and
    resumed by the next ``dvc repro``; smoke.json and the stages' metrics in smoke/."""
    import yaml

    out = Path(a.out).resolve()
    ws = out / "smoke-ws"
    record: dict[str, Any] = {"size": a.size, "device": a.device, "workspace": str(ws)}
    result = out / "smoke.json"
    if ws.exists():
        shutil.rmtree(ws)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "gpu-check", "GIT_AUTHOR_EMAIL": "gpu@check",
           "GIT_COMMITTER_NAME": "gpu-check", "GIT_COMMITTER_EMAIL": "gpu@check"}
    for key in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    dvc = [sys.executable, "-m", "dvc"]
    t0 = time.perf_counter()
    if a.from_workspace:
        copy_workspace(Path(a.from_workspace), ws)
        record["copied_from"] = a.from_workspace
    else:
        ws.mkdir(parents=True)
        record["files_copied"] = copy_tree(ROOT, ws, skip=(out,))
    params = yaml.safe_load((ws / "params.yaml").read_text())
    keep = bool(a.from_workspace) and params.get("scale") == a.size
    params = smoke_params(params, a.size, a.device, keep=keep)
    record["stage_instances"] = validate_params(params)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if not (ws / ".git").exists():
        if shutil.which("git"):
            for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "gpu-check smoke"]):
                subprocess.run(cmd, cwd=ws, env=env, check=True, capture_output=True)
        else:  # no git on the machine: DVC without an SCM
            subprocess.run([*dvc, "config", "core.no_scm", "true"], cwd=ws, env=env, check=True, capture_output=True)
    record["setup_s"] = round(time.perf_counter() - t0, 1)
    write_json(result, record)

    scale, run = params["scale"], f"{VARIANT}-{SEED}"
    targets = [f"{stage}@{run}" for stage in SMOKE_STAGES]
    checkpoints = ws / "checkpoints" / scale / VARIANT / f"seed{SEED}"
    log: list[str] = []
    # 1. the training, SIGKILLed once a checkpoint of step >= KILL_AT exists
    if checkpoints.exists():  # a built workspace's finished run: train it again, from nothing
        shutil.rmtree(checkpoints)
    first = [*dvc, "repro", "--force", "--single-item", f"train@{run}"] if keep else [*dvc, "repro", f"train@{run}"]
    print(f"[smoke] the training is killed at its checkpoint of step >= {KILL_AT[a.size]}", flush=True)
    streamed = _Streamed(first, ws, env)
    killed: list[int] = []
    while streamed.proc.poll() is None:
        steps = _checkpoint_steps(checkpoints)
        if steps and steps[-1] >= KILL_AT[a.size]:
            killed = _kill_training(ws)
            if killed:
                break
        time.sleep(0.02)
    first_rc, first_out, first_s = streamed.wait()
    log.append(first_out)
    steps = _checkpoint_steps(checkpoints)
    print(f"[smoke] killed {killed or 'nothing'}; checkpoints {steps}", flush=True)
    record.update(first_repro_s=round(first_s, 1), killed_pids=killed, first_repro_rc=first_rc,
                  checkpoints_after_kill=steps)
    write_json(result, record)
    if not killed:
        errors = [line for line in first_out.splitlines() if line.startswith(("error", "ERROR"))]
        return fail(f"the training was not killed: `{' '.join(first[2:])}` exited {first_rc} before a "
                    f"checkpoint of step >= {KILL_AT[a.size]} (checkpoints: {steps or 'none'})"
                    + (f": {errors[-1]}" if errors else "; see smoke.log"))
    # 2. dvc repro again: the training resumes from its newest checkpoint, then the stages after it run (a built
    # workspace's dvc.lock and cache hold the finished training, so it is forced again; the stages after it are
    # up to date there)
    second = [*dvc, "repro", "--force", "--single-item", f"train@{run}"] if keep else [*dvc, "repro", *targets]
    rc, text, seconds = _run(second, ws, env, log)
    record.update(second_repro_s=round(seconds, 1), second_repro_rc=rc)
    resumed = re.search(r"resumed from (\S+) at step (\d+)", text)
    perf = re.search(r"run\.perf = (.+)", "\n".join(log))
    record.update(resumed=resumed.group(0) if resumed else None, resumed_at_step=int(resumed.group(2)) if resumed
                  else None, perf_line=perf.group(1).strip() if perf else None)
    record["stages_run"] = re.findall(r"Running stage '([^']+)'", text)
    # 3. what the stages wrote
    saved = out / "smoke"
    if saved.exists():
        shutil.rmtree(saved)
    saved.mkdir()
    metrics: dict[str, Any] = {}
    for kind in ("train", "eval", "fid", "robustness"):
        for suffix in (".json", ".notes.json"):
            path = ws / "metrics" / scale / kind / VARIANT / f"seed{SEED}{suffix}"
            if path.exists():
                shutil.copy2(path, saved / f"{kind}{suffix}")
                metrics.setdefault(kind, {}).update(read_json(path) or {})
    for name in ("params.yaml", "dvc.lock"):
        if (ws / name).exists():
            shutil.copy2(ws / name, saved / name)
    record["metrics"] = metrics
    record["tensor_devices"] = _saved_devices(ws / "models" / scale / VARIANT / f"seed{SEED}" / "final.pt")
    line = record["perf_line"] or ""
    record["paths"] = {  # what the issue asks the smoke run to exercise, and the evidence
        "bf16 autocast": "loss bf16" in line and "sampler bf16" in line, "channels_last": "channels_last" in line,
        "fused optimizer": "fused optimizer" in line, "buffer and data on the training device": bool(line)
        and "buffer_device on cpu" not in line and "data_device on cpu" not in line,
        "checkpoint resume": resumed is not None,
        "weights_only loads of the saved tensors": isinstance(record["tensor_devices"], dict)
        and all(k in metrics for k in ("eval", "robustness"))}
    record["total_s"] = round(time.perf_counter() - t0, 1)
    write_json(result, record)
    if rc != 0:
        errors = [line for line in text.splitlines() if line.startswith(("error", "ERROR"))]
        return fail(f"dvc repro after the kill exited {rc}: {errors[-1] if errors else text.strip()[-200:]}")
    if not resumed:
        return fail("the second dvc repro did not resume the training from a checkpoint (no 'resumed from' line)")
    missing = [k for k in ("train", "eval", "fid", "robustness") if k not in metrics]
    if missing:
        return fail(f"no metrics from {', '.join(missing)} in {ws / 'metrics' / scale}")
    missed = [k for k, v in record["paths"].items() if not v and (a.device.startswith("cuda") or k != "bf16 autocast")]
    if missed:
        return fail(f"the smoke run did not exercise: {', '.join(missed)} (run.perf = {record['perf_line']})")
    print(f"[smoke] ok: killed at checkpoint {steps[-1] if steps else '?'}, {record['resumed']}; "
          f"{record['total_s']} s", flush=True)
    return 0


def _saved_devices(path: Path) -> dict[str, int] | str:
    """On which devices the tensors of ``path`` were saved (torch.load(weights_only=True) without a
    map_location restores them there): the weights_only load of CUDA tensors."""
    try:
        import torch

        payload = torch.load(path, weights_only=True)
    except Exception as exc:  # reported, not fatal: the stages' own loads are the check
        return f"not loaded: {type(exc).__name__}: {str(exc)[:160]}"
    counts: dict[str, int] = {}

    def walk(x: Any) -> None:
        if hasattr(x, "device") and hasattr(x, "dtype"):
            counts[str(x.device)] = counts.get(str(x.device), 0) + 1
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(payload)
    return counts


# ---- smoke-fid --------------------------------------------------------------------------------------------
def smoke_fid(a: argparse.Namespace) -> int:
    """The fid stage's reference() and score(), in process, on the smoke run's data and samples, with
    pytorch-fid's Inception architecture and random weights (``dvc repro`` has no weights file offline and
    records IS/FID as unavailable): the stage's own code path on the device, timed; the numbers mean nothing.
    At the tiny size (the CPU rehearsal) a small random network with the same interface stands in for the
    Inception network (64 features: seconds instead of a minute of 299x299 passes and 2048-d Frechet
    distances on a CPU; tests/test_inception.py and tests/test_fid_stage.py check the real one)."""
    import argparse as ap

    import yaml

    out = Path(a.out).resolve()
    ws = out / "smoke-ws"
    if not (ws / "params.yaml").exists():
        return fail(f"no smoke workspace at {ws}: the smoke part did not run")
    scale = yaml.safe_load((ws / "params.yaml").read_text())["scale"]
    samples = ws / "samples" / scale / VARIANT / f"seed{SEED}"
    if not (samples / "samples.npz").exists():
        return fail(f"{samples}/samples.npz not found: the smoke run's sample stage did not finish")
    os.chdir(ws)
    os.environ["DVC_ROOT"] = str(ws)
    sys.path.insert(0, str(ws))  # the workspace's stages, pipeline and jem
    for name in [m for m in sys.modules if m.split(".")[0] in ("jem", "stages", "pipeline")]:
        del sys.modules[name]
    import torch

    import stages.fid as fid_stage

    work = Path("gpu-check-fid")
    if work.exists():
        shutil.rmtree(work)
    t0 = time.perf_counter()
    if a.size == "tiny":
        model, weights = _small_features(), "a small random stand-in (tiny size: 64 features)"
    else:
        from jem.evaluation.inception import FIDInception, fid_inception_architecture, random_inception_state

        net = fid_inception_architecture()
        net.load_state_dict(random_inception_state(seed=0))
        model, weights = FIDInception(net), "random (pytorch-fid's architecture; the numbers mean nothing)"
    fid_stage.load_fid_inception = lambda weights, download=False, device="cpu", check_hash=True: model.to(device)
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    fid_stage.reference(ap.Namespace(data=Path("data") / scale / "cifar10", out=work / "fid_ref" / "cifar10",
                                     config=None, inputs=None))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    reference_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    fid_stage.score(ap.Namespace(samples=samples, ref=work / "fid_ref", metrics=work / "metrics.json", config=None,
                                 inputs=None))
    score_s = time.perf_counter() - t2
    info = read_json(work / "fid_ref" / "cifar10" / "info.json") or {}
    metrics = deep_merge(read_json(work / "metrics.json") or {}, read_json(work / "metrics.notes.json") or {})
    record = {"weights": weights, "build_s": round(build_s, 2), "reference_s": round(reference_s, 2),
              "reference_images": info.get("images"), "score_s": round(score_s, 2), "status": metrics.get("status"),
              "sets": {k: {"n": v.get("n"), "is": v.get("is"), "fid": v.get("fid")} for k, v in metrics.items()
                       if isinstance(v, dict) and "n" in v}}
    write_json(out / "smoke-fid.json", record)
    print(json.dumps(record, indent=2))
    if metrics.get("status") != "ok" or not record["sets"]:
        return fail(f"the fid stage with random weights recorded status {metrics.get('status')!r}: "
                    f"{metrics.get('reason', 'no sets scored')}")
    return 0


def _small_features() -> Any:
    """The FIDInception interface (images in [-1, 1] -> pool features, unbiased logits) on a small random
    network: 64 features, 1008 logits."""
    import torch
    from torch import nn

    class SmallFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.proj = nn.Linear(48, 64)
            self.fc = nn.Linear(64, 1008, bias=False)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pool = torch.tanh(self.proj(self.pool(x).flatten(1)))
            return pool, self.fc(pool)

    return SmallFeatures().eval()


# ---- bn -----------------------------------------------------------------------------------------------------
def bn(a: argparse.Namespace) -> int:
    """Eval-mode test accuracy against accuracy with batch-norm statistics re-estimated over the training
    split (the evaluate stage's two numbers): within BN_POINTS at the paper size. At the tiny size (128 test
    images, 16 iterations) it is reported, not required."""
    out = Path(a.out)
    metrics = ((read_json(out / "smoke.json") or {}).get("metrics") or {}).get("eval") or {}
    if "accuracy" not in metrics or "accuracy_bn_reestimated" not in metrics:
        return fail("no accuracy / accuracy_bn_reestimated from the smoke run's evaluate stage")
    acc, acc_bn = 100 * float(metrics["accuracy"]), 100 * float(metrics["accuracy_bn_reestimated"])
    diff = abs(acc - acc_bn)
    record = {"accuracy": round(acc, 2), "accuracy_bn_reestimated": round(acc_bn, 2), "points_apart": round(diff, 2),
              "within": BN_POINTS, "agree": diff <= BN_POINTS, "required": a.size == "paper"}
    write_json(out / "bn.json", record)
    line = f"eval-mode {acc:.2f} % vs re-estimated BN {acc_bn:.2f} %: {diff:.2f} points apart"
    if diff > BN_POINTS and a.size == "paper":
        return fail(f"{line} (more than {BN_POINTS:g})")
    print(f"[bn] {line}" + ("" if diff <= BN_POINTS else f" (more than {BN_POINTS:g}; not required at --size tiny)"))
    return 0


# ---- targets and profile ------------------------------------------------------------------------------------
def targets(out: Path, device_name: str) -> list[dict[str, Any]]:
    """Each target with its goal, what was measured and pass / miss / n/a (the speed targets are a GPU's)."""
    rows: list[dict[str, Any]] = []
    gpu = device_name != "cpu" and not device_name.startswith("CPU")
    bench = read_json(out / "bench.json")
    training = bench.get("training", []) if isinstance(bench, dict) else bench or []
    ms = {(r["variant"], r["mode"]): r["ms_per_iter"] for r in training}
    names = {"sadajem_k5": "SADA-JEM K=5", "jempp_m10": "JEM++ M=10", "jem_k20": "JEM K=20"}
    for variant, goal in SPEEDUP_TARGETS.items():
        row = {"target": f"{names[variant]}: fast paths vs the authors' iteration", "goal": f">= {goal:g}x",
               "variant": variant, "kind": "speed"}
        if (variant, "fast") in ms and (variant, "reference") in ms:
            ratio = ms[(variant, "reference")] / ms[(variant, "fast")]
            row.update(value=ratio, measured=f"{ratio:.2f}x ({ms[(variant, 'reference')]:.1f} -> "
                                                f"{ms[(variant, 'fast')]:.1f} ms/it)",
                       result=("pass" if ratio >= goal else "miss") if gpu else "n/a (not a GPU)")
        else:
            row.update(measured="not measured", result="not measured")
        rows.append(row)
    row = {"target": "SADA-JEM K=5 ms per iteration (fast paths)", "goal": f"<= {SADA_MS_TARGET:g} ms on an H100",
           "variant": "sadajem_k5", "kind": "speed"}
    if ("sadajem_k5", "fast") in ms:
        value = ms[("sadajem_k5", "fast")]
        h100 = "H100" in device_name
        row.update(value=value, measured=f"{value:.1f} ms on {device_name}",
                   result=("pass" if value <= SADA_MS_TARGET else "miss") if h100 else "n/a (not an H100)")
    else:
        row.update(measured="not measured", result="not measured")
    rows.append(row)
    fid = (read_json(out / "fid.json") or {}).get("fid")
    row = {"target": "FID/IS of 50,000 samples (Inception + statistics + Frechet)",
           "goal": f"<= {FID_50K_TARGET_S:g} s", "kind": "fid"}
    if fid:
        at50k = fid["images"] >= 50_000
        value = fid["total_s"] if at50k else fid["projected_50k_s"]
        row.update(value=value, measured=(f"{value:.1f} s" if at50k else f"{value:.0f} s projected from "
                                          f"{fid['images']}") + f" (Inception {fid['features_s']:.1f} s, "
                   f"{fid['images_per_s']:.0f} img/s; mean/cov + IS {fid['stats_is_s']:.2f} s; Frechet "
                   f"{fid['frechet_s']:.2f} s)", result=("pass" if value <= FID_50K_TARGET_S else "miss") if at50k
                   else "n/a (fewer than 50,000 samples)")
    else:
        row.update(measured="not measured", result="not measured")
    rows.append(row)
    b = read_json(out / "bn.json")
    row = {"target": "eval-mode vs re-estimated-BN test accuracy after the smoke run", "goal": f"within {BN_POINTS:g} "
           "point", "kind": "bn"}
    if b:
        row.update(value=b["points_apart"], measured=f"{b['accuracy']:.2f} % vs {b['accuracy_bn_reestimated']:.2f} % "
                   f"({b['points_apart']:.2f} points)", result=("pass" if b["agree"] else "miss") if b["required"]
                   else f"n/a at tiny size ({'within' if b['agree'] else 'outside'})")
    else:
        row.update(measured="not measured", result="not measured")
    rows.append(row)
    return rows


def profile(a: argparse.Namespace) -> int:
    """torch.profiler over fast-path iterations of each variant that missed a speed target (or each
    ``--variant``): the operators by self device time, profile-<variant>.txt."""
    out = Path(a.out)
    name = (read_json(out / "env.json") or {}).get("device", a.device)
    missed = sorted({t["variant"] for t in targets(out, name) if t["kind"] == "speed" and t["result"] == "miss"})
    missed = a.variant or missed
    if not missed:
        write_json(out / "profile.json", {"skipped": "no speed target missed"})
        print("[profile] no speed target missed: nothing to profile")
        return 0
    import torch
    import yaml

    from jem.bench.speed import fast_perf
    from jem.config.params import resolve_variant
    from jem.config.variant import Variant
    from jem.data.synthetic import make_shapes
    from jem.method.gmm import compute_mixture_stats
    from jem.method.train import Trainer

    device = torch.device(a.device)
    params = yaml.safe_load(Path(a.params).read_text())
    scale = "paper" if a.size == "paper" else "demo"
    steps, warmup = (5, 3) if a.size == "paper" else (1, 1)
    cuda = device.type == "cuda"
    record: dict[str, Any] = {}
    for variant_name in missed:
        d = resolve_variant(params, variant_name, scale).to_dict()
        if a.size == "tiny":  # as the bench part's --depth 10 --width 1 --image-size 16 --batch 8
            d["model"].update(depth=10, width=1, image_size=16)
            d["train"].update(batch_size=8, px_batch_size=1)
        variant = Variant.from_dict(d, where=f"methods.{variant_name}")
        n = 1024
        x, y = make_shapes(n, variant.model.image_size, seed=0)
        mixture = compute_mixture_stats([(x[i:i + 512], y[i:i + 512]) for i in range(0, n, 512)],
                                        variant.model.num_classes) if variant.buffer.init == "gmm" else None
        trainer = Trainer(variant, x, y, mixture=mixture, device=device, perf=fast_perf(device))
        for _ in range(warmup):
            trainer.train_step()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.train_step()
            if cuda:
                torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) / steps
        events = prof.key_averages()

        def self_time(e: Any) -> float:
            if cuda:
                return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
            return float(e.self_cpu_time_total)

        total = sum(self_time(e) for e in events) or 1.0
        top = sorted(events, key=self_time, reverse=True)[:12]
        sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        try:
            table = events.table(sort_by=sort_by, row_limit=30)
        except Exception:
            table = events.table(sort_by="self_cpu_time_total", row_limit=30)
        (out / f"profile-{variant_name}.txt").write_text(
            f"torch.profiler, {variant_name} fast paths on {name}: {steps} iterations after {warmup} warm-up, "
            f"{1e3 * wall:.1f} ms/it with the profiler on\n\n{table}\n")
        record[variant_name] = {
            "ms_per_iter_profiled": round(1e3 * wall, 2), "steps": steps,
            "time": "self device (CUDA kernel) time" if cuda else "self CPU time",
            "top": [{"op": e.key, "share_pct": round(100 * self_time(e) / total, 1), "calls": e.count,
                     "ms_per_iter": round(self_time(e) / 1e3 / steps, 3)} for e in top]}
        print(f"[profile] {variant_name}: " + ", ".join(f"{t['op']} {t['share_pct']} %"
                                                        for t in record[variant_name]["top"][:6]), flush=True)
        del trainer
        if cuda:
            torch.cuda.empty_cache()
    write_json(out / "profile.json", record)
    return 0


# ---- summary ----------------------------------------------------------------------------------------------
def _hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _reason(out: Path, name: str, rc: str, box: str) -> str:
    if rc == "skipped":
        return f"skipped: the time budget ({box} s) was spent"
    if rc in ("124", "137"):
        return f"timed out after {box} s"
    lines = [line.strip() for line in (out / f"{name}.log").read_text(errors="replace").splitlines()
             if line.strip()] if (out / f"{name}.log").exists() else []
    errors = [line for line in lines if line.startswith(("error:", "ERROR:"))
              or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
    text = (errors or lines or [f"exit status {rc}, no output"])[-1]
    return text if len(text) <= 300 else text[:297] + "..."


def summary(a: argparse.Namespace) -> int:
    """summary.md and summary.json from what the parts wrote; with --final also performance.md (the
    jem-bench Markdown of the bench and fid parts)."""
    out = Path(a.out)
    env_info = read_json(out / "env.json") or {}
    name = env_info.get("device") or ("cpu" if a.device == "cpu" else "unknown (the env part did not finish)")
    parts: dict[str, dict[str, Any]] = {}
    if (out / "parts.tsv").exists():
        for line in (out / "parts.tsv").read_text().splitlines():
            part, rc, seconds, box = [*line.split("\t"), "", "", ""][:4]
            ok = rc == "0"
            parts[part] = {"result": "ok" if ok else ("skipped" if rc == "skipped" else "FAILED"),
                           "seconds": int(seconds or 0), "box": box,
                           "note": "" if ok else _reason(out, part, rc, box)}
    notes = _part_notes(out)
    for part, note in notes.items():
        if part in parts and parts[part]["result"] == "ok":
            parts[part]["note"] = note
    rows = targets(out, name)
    total = sum(p["seconds"] for p in parts.values())
    lines = [f"# GPU check: {name}", "",
             f"`scripts/gpu_check.sh --device {a.device} --size {a.size}`; torch {env_info.get('torch', '?')}"
             + (f", CUDA {env_info['cuda']}" if env_info.get("cuda") else "")
             + (f", {env_info['capability']}, {env_info['memory_gib']} GiB" if env_info.get("capability") else "")
             + f", Python {env_info.get('python', '?')}; {_hms(total)} in all; {time.strftime('%Y-%m-%d %H:%M')}.",
             "", "## Targets", "", "| target | goal | measured | result |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['goal']} | {t['measured']} | {t['result']} |" for t in rows]
    lines += ["", "## Parts", "", "| part | result | time | note |", "|---|---|---:|---|"]
    for part in PARTS:
        p = parts.get(part)
        if p is None:
            lines.append(f"| {part} | not run | | |")
        else:
            lines.append(f"| {part} | {p['result']} | {p['seconds']} s | {p['note'].replace('|', '/')} |")
    prof = read_json(out / "profile.json") or {}
    for variant, r in prof.items():
        if isinstance(r, dict) and r.get("top"):
            lines += ["", f"Where the time goes, {variant} ({r['time']}, {r['ms_per_iter_profiled']} ms/it profiled; "
                      f"profile-{variant}.txt): " + ", ".join(f"{t['op']} {t['share_pct']} %" for t in r["top"][:8])]
    failed = [p for p, v in parts.items() if v["result"] == "FAILED"]
    skipped = [p for p, v in parts.items() if v["result"] == "skipped"]
    lines += ["", f"{len(parts) - len(skipped)} of {len(PARTS)} parts ran; "
              + (f"failed: {', '.join(failed)}" if failed else "none failed")
              + (f"; skipped (time budget): {', '.join(skipped)}." if skipped else ".")]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    write_json(out / "summary.json", {"device": name, "size": a.size, "parts": parts, "targets": rows})
    if a.final:
        performance_md(out, a)
    print("\n".join(lines))
    return 0


def _part_notes(out: Path) -> dict[str, str]:
    """One line per part that went well: what it measured."""
    notes: dict[str, str] = {}
    e = read_json(out / "env.json")
    if e:
        pk = e.get("packages", {})
        notes["env"] = f"{e.get('device')}; dvc {pk.get('dvc')}, mlflow {pk.get('mlflow')}, scipy {pk.get('scipy')}"
    bench = read_json(out / "bench.json")
    if bench:
        training = bench.get("training", []) if isinstance(bench, dict) else bench
        fast = [r for r in training if r["mode"] == "fast"]
        notes["bench"] = "; ".join(f"{r['variant']} {r['model']} {r['batch']}/{r['px_batch']}: {r['ms_per_iter']:.1f} "
                                   "ms/it fast" for r in fast) + " (bench.md)"
    fid = (read_json(out / "fid.json") or {}).get("fid")
    if fid:
        notes["fid"] = (f"{fid['images']} samples: Inception {fid['features_s']:.2f} s, mean/cov + IS "
                        f"{fid['stats_is_s']:.2f} s, Frechet {fid['frechet_s']:.2f} s, total {fid['total_s']:.2f} s")
    s = read_json(out / "smoke.json")
    if s:
        train = (s.get("metrics") or {}).get("train") or {}
        notes["smoke"] = (f"{train.get('steps')} iterations ({train.get('train_seconds')} s of training); "
                          f"killed with checkpoints {s.get('checkpoints_after_kill')}, {s.get('resumed')}; "
                          f"run.perf = {s.get('perf_line')}; final.pt tensors on {s.get('tensor_devices')}; paths "
                          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in (s.get("paths") or {}).items()) + "; "
                          f"stages run: {', '.join(s.get('stages_run') or []) or 'none'}")
    f = read_json(out / "smoke-fid.json")
    if f:
        notes["smoke-fid"] = (f"fid_ref {f['reference_s']} s ({f['reference_images']} images), score {f['score_s']} s, "
                              + ", ".join(f"{k}: {v['n']} images" for k, v in f["sets"].items()) + f"; {f['weights']}")
    b = read_json(out / "bn.json")
    if b:
        notes["bn"] = f"{b['accuracy']} % vs {b['accuracy_bn_reestimated']} % ({b['points_apart']} points)"
    p = read_json(out / "profile.json")
    if p is not None:
        notes["profile"] = p.get("skipped") or ", ".join(f"profile-{v}.txt" for v in p)
    return notes


def performance_md(out: Path, a: argparse.Namespace) -> None:
    """bench.json and fid.json as one jem-bench report (jem.bench.markdown), the commands named."""
    bench, fid = read_json(out / "bench.json"), (read_json(out / "fid.json") or {}).get("fid")
    training = (bench.get("training", []) if isinstance(bench, dict) else bench) or []
    if not training and not fid:
        return
    from jem.bench.markdown import markdown_report

    n = fid["images"] if fid else 0
    command = (f"scripts/gpu_check.sh --device {a.device} --size {a.size}: jem-bench --compare"
               + (f", then jem-bench --skip-train --fid {n}" if fid else ""))
    (out / "performance.md").write_text(markdown_report(training, command, fid))


def merge_report(a: argparse.Namespace) -> int:
    """Put a gpu-check performance.md into reports/performance.md as its "## On a GPU" section (replacing
    that section, or appended), its headings one level down; the CPU sections above stay as they are."""
    gpu = Path(a.gpu).read_text()
    target = Path(a.into)
    text = target.read_text() if target.exists() else "# Speed: the reference loop, our baseline and the fast paths\n"
    body = gpu.splitlines()
    cut = next((i for i, line in enumerate(body) if line.startswith("## On a GPU")), len(body))
    body = [line for line in body[:cut] if not line.startswith("# ")]  # its title and its own "On a GPU" go
    device = re.search(r"on \*\*([^*]+)\*\*", gpu)
    body = [("#" + line) if line.startswith("##") else line for line in body]
    section = [f"## On a GPU: {device.group(1) if device else 'GPU'}", "",
               "From the GPU check (`scripts/gpu_check.sh`; its summary.md has the targets and the smoke run).", *body]
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("## On a GPU")), None)
    if start is None:
        lines += ["", *section]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section + ([""] if end < len(lines) else [])
    target.write_text("\n".join(lines).rstrip("\n") + "\n")
    print(f"wrote {target}")
    return 0


# ---- wheels for the device machine -------------------------------------------------------------------------
# The packages its image already holds (/work/.library/device/KINDS.md, "Python packages already there").
DEVICE_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda- cuda-bindings cuda-core
cuda-toolkit cuda13-plugin cupy-cuda13x cycler cython diffrax e3nn einops einsum-fx equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax- jax-cuda13-pjrt jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear- lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-
curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless operator opt- opt-
einsum optax optimistix orbax-checkpoint packaging pandas pathfinder pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil py-cpuinfo pyarrow pybind11 pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-
image scikit-learn scipy seaborn sentence-transformers sentencepiece setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torch-geometric torchaudio torchdiffeq torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
ROOTS = (("dvc", ()), ("mlflow", ("auth",)), ("foolbox", ()), ("pytorch-fid", ()), ("ruamel.yaml.clib", ()))
PIP_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                *[f for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                              "manylinux2014_x86_64", "manylinux1_x86_64") for f in ("--platform", p)]]


def missing_packages() -> dict[str, str]:
    """What the stages need beyond the device image: the dependency closure of dvc, mlflow[auth], foolbox,
    pytorch-fid (as this virtualenv installed it, markers read for Python 3.12 on Linux) less the packages
    there and what they need, pinned to this virtualenv's versions."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    def norm(n: str) -> str:
        return re.sub(r"[-_.]+", "-", n).lower()

    marker_env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "os_name": "posix"}
    seen: dict[str, str | None] = {}

    def walk(name: str, extras: tuple[str, ...]) -> None:
        key = norm(name)
        if key in seen:
            return
        try:
            dist = md.distribution(key)
        except md.PackageNotFoundError:
            seen[key] = None
            return
        seen[key] = dist.version
        if key in DEVICE_PACKAGES:  # there with what it needs (torch with its CUDA libraries)
            return
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({**marker_env, "extra": e}) for e in ("", *extras)):
                walk(req.name, tuple(req.extras))

    for name, extras in ROOTS:
        walk(name, extras)
    return {k: v for k, v in sorted(seen.items()) if v and k not in DEVICE_PACKAGES}


def wheels(a: argparse.Namespace) -> int:
    """``pip download --no-deps`` (the device README's flags) of every missing package into ``--dest``;
    a package with no binary wheel for the device is built here (``pip wheel --no-deps``)."""
    dest = Path(a.dest)
    dest.mkdir(parents=True, exist_ok=True)
    pins = missing_packages()
    pip = [sys.executable, "-m", "pip"]
    built = []
    for name, version in pins.items():
        have = [p for p in dest.glob("*.whl") if re.sub(r"[-_.]+", "-", p.name.split("-")[0]).lower() == name
                and p.name.split("-")[1] == version]
        if have:
            continue
        spec = f"{name}=={version}"
        proc = subprocess.run([*pip, "download", "-q", "--no-deps", *PIP_PLATFORM, "-d", str(dest), spec],
                              capture_output=True, text=True)
        if proc.returncode != 0:  # sdist only (antlr4-python3-runtime 4.9.3): a pure-Python wheel built here
            proc = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(dest), spec], capture_output=True,
                                  text=True)
            built.append(spec)
        if proc.returncode != 0:
            return fail(f"{spec}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'}")
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    print(f"{len(pins)} packages in {dest} ({size / 2**20:.1f} MiB)" + (f"; built here: {', '.join(built)}"
                                                                       if built else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("env", "smoke", "smoke-fid", "bn", "profile", "summary"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--device", default="cuda")
        p.add_argument("--size", choices=("paper", "tiny"), default="paper")
        if name == "smoke":
            p.add_argument("--from-workspace", help="start from a copy of this built workspace (tiny rehearsal)")
        if name == "profile":
            p.add_argument("--params", default=str(ROOT / "params.yaml"))
            p.add_argument("--variant", action="append", help="profile this variant (repeatable) whatever the targets")
        if name == "summary":
            p.add_argument("--final", action="store_true", help="also performance.md")
    m = sub.add_parser("merge-report")
    m.add_argument("gpu", help="a gpu-check performance.md")
    m.add_argument("into", help="reports/performance.md")
    w = sub.add_parser("wheels")
    w.add_argument("--dest", default=".whl")
    a = ap.parse_args(argv)
    handlers = {"env": env, "smoke": smoke, "smoke-fid": smoke_fid, "bn": bn, "profile": profile, "summary": summary,
                "merge-report": merge_report, "wheels": wheels}
    try:
        return handlers[a.command](a)
    except Exception as exc:  # one line for the summary; the traceback stays in the part's log
        import traceback

        traceback.print_exc()
        return fail(f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


if __name__ == "__main__":
    sys.exit(main())
