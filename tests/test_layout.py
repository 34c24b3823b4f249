"""DESIGN.md's import directions, checked on the source: cli → all; serving → registry, core;
registry → core types/format only; core → none of the others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Repository directory -> installed package, and what each may import from the project.
PACKAGES = {
    "adapterhub": "adapterhub",
    "registry": "adapterhub.registry",
    "serving": "adapterhub.serving",
    "cli": "adapterhub.cli",
}
FORBIDDEN = {
    "adapterhub": ("adapterhub.registry", "adapterhub.serving", "adapterhub.cli"),
    "registry": ("adapterhub.serving", "adapterhub.cli", "torch", "transformers", "peft", "adapterhub.models",
                 "adapterhub.train", "adapterhub.merge", "adapterhub.eval"),
    "serving": ("adapterhub.cli",),
    "cli": (),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("directory", sorted(PACKAGES))
def test_import_directions(directory: str) -> None:
    violations = []
    for path in sorted((ROOT / directory).rglob("*.py")):
        for line, module in _imports(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[directory]):
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not violations, "\n".join(violations)


def test_only_the_vllm_backend_imports_vllm() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for directory in PACKAGES
        for path in (ROOT / directory).rglob("*.py")
        if path.name != "vllm_engine.py"
        for line, module in _imports(path)
        if module == "vllm" or module.startswith("vllm.")
    ]
    assert not offenders


def test_packages_install_under_one_namespace() -> None:
    code = "import adapterhub.registry, adapterhub.serving, adapterhub.cli, adapterhub; print(adapterhub.registry.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()).parent == ROOT / "registry"


def test_the_kinds_table_and_the_format_import_no_torch() -> None:
    """The registry reads adapters through these two; they stay header-and-JSON only."""
    code = (
        "import sys, adapterhub.kinds, adapterhub.formats; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _routes_declared(path: Path) -> list[str]:
    """Paths of the `@<router or app>.get/post(...)` decorators in one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr in ("get", "post", "put", "delete") and decorator.args
                    and isinstance(decorator.args[0], ast.Constant)
                ):
                    found.append(decorator.args[0].value)
    return found


def test_each_api_surface_has_its_own_route_module() -> None:
    """DESIGN.md: one module per API surface in `serving/routes/`, none in the app builder."""
    declared = {path.stem: _routes_declared(path) for path in sorted((ROOT / "serving" / "routes").glob("*.py"))}
    surfaces = {stem: sorted(paths) for stem, paths in declared.items() if paths}
    assert surfaces == {
        "adapters": ["/load_lora_adapter", "/unload_lora_adapter"],
        "chat": ["/chat/completions"],
        "completions": ["/completions"],
        "health": ["/health", "/metrics"],
        "models": ["/models", "/models/{model_id:path}"],
    }
    assert _routes_declared(ROOT / "serving" / "app.py") == []
