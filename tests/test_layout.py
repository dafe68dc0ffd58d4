"""The repository stands alone and its layers stay in order: engine → timm adapter → Lightning → CLI."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lightning_resode"

# Paths of one machine, and notes that live outside the repository. Written with character classes so
# that this file does not match itself.
NOT_STANDALONE = re.compile(r"/wor[k]/|/tm[p]/[A-Za-z_]+\.json|\.\./share[d]|\b(?:PAPE[R]|DESIG[N])\b")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    result = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("not a git checkout (e.g. an sdist or a Docker build context)")
    return [name for name in result.stdout.split("\0") if name]


def test_committed_files_name_no_machine_path_and_no_document_outside_the_repo() -> None:
    offenders = []
    for name in _tracked_files():
        path = REPO / name
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (figures)
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if NOT_STANDALONE.search(line):
                offenders.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not offenders, (
        "committed files must stand alone: no machine paths, no notes kept outside the repository "
        "(the method is docs/method.md, the design docs/design.md):\n" + "\n".join(offenders)
    )


def test_the_standalone_check_catches_what_it_is_for() -> None:
    for bad in ("see /wor" "k/shared/x", "written to /tm" "p/bench_engine.json", "../shar" "ed/notes",
                "as PAP" "ER.md says", "docs/DESI" "GN asks"):
        assert NOT_STANDALONE.search(bad), bad
    for fine in ("docs/method.md", "docs/design.md", "tmp_path / 'out.json'", "the paper's Heun scheme"):
        assert not NOT_STANDALONE.search(fine), fine


def test_the_engine_benchmark_json_records_results_not_where_it_was_written(tmp_path: Path) -> None:
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        bench_engine = importlib.import_module("bench_engine")
    finally:
        sys.path.remove(str(REPO / "scripts"))
    out = tmp_path / "bench.json"
    bench_engine.main(["--depths", "2", "4", "--pairs", "0", "--variants", "backprop", "--channels", "2",
                       "--size", "4", "--batch", "2", "--json", str(out)])
    text = out.read_text()
    assert "backprop" in text and str(tmp_path) not in text


# ---------------------------------------------------------------------------------------------- layers
ENGINE = "engine"
ADAPTER = "timm adapter"
LIGHTNING = "Lightning"
CLI = "CLI"
ORDER = [ENGINE, ADAPTER, LIGHTNING, CLI]


def _layer(module: str) -> str:
    """The layer of a lightning_resode module (dotted name)."""
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: re-exports the engine and the adapter
        return ADAPTER
    if parts[1] == "adjoint":
        return ENGINE
    if parts[1] == "lit":
        return LIGHTNING
    if parts[1] in ("cli", "__main__"):
        return CLI
    return ADAPTER


# third-party packages a layer may not import: the engine is torch only, Lightning starts at lit/
FORBIDDEN_THIRD_PARTY = {ENGINE: {"timm", "lightning", "pytorch_lightning"}, ADAPTER: {"lightning", "pytorch_lightning"}}


def _module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Absolute names of everything ``path`` imports, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from .. import x: x may be a module
                    names += [f"{target}.{alias.name}" for alias in node.names]
                else:
                    names.append(target)
            else:
                names.append(node.module or "")
    return names


def test_each_layer_imports_only_the_layers_before_it() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        layer = _layer(module)
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "lightning_resode":
                used = _layer(name)
                if ORDER.index(used) > ORDER.index(layer):
                    violations.append(f"{module} ({layer}) imports {name} ({used})")
            elif top in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                violations.append(f"{module} ({layer}) imports {name}")
    assert not violations, "layers must import only the layers before them:\n" + "\n".join(violations)


LIGHTNING_INTERNALS = re.compile(
    r"\._(?:signal_connector|batches_that_stepped|layer_sync|experiment|logger_connector|accelerator_connector"
    r"|checkpoint_connector|callback_connector|data_connector|active_loop|results|wandb_init|average_model)\b"
)


def test_lightning_internals_are_touched_in_one_module_only() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "_lightning_private.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if LIGHTNING_INTERNALS.search(line)
    ]
    assert not offenders, (
        "Lightning internals belong in lightning_resode/lit/_lightning_private.py (tested against each "
        "Lightning release there): " + ", ".join(offenders)
    )
