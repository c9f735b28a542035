"""The package layout stays as documented: importing the layer loads no training application, the README's
layout table names every library file, pyproject installs every package, CI runs the README's command."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _library_files() -> list[str]:
    files = []
    for top in ("cbam_multi", "backends"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            # cbam_multi/torch and cbam_multi/jax are development symlinks to backends/ (not in git)
            if rel.parts[:2] in (("cbam_multi", "torch"), ("cbam_multi", "jax")):
                continue
            files.append(rel.as_posix())
    return files


# (module to import, framework imported first so its own imports do not count)
IMPORTS = [("cbam_multi", None), ("cbam_multi.torch", "torch"), ("cbam_multi.jax", "flax.nnx")]


@pytest.mark.parametrize(("module", "framework"), IMPORTS)
def test_importing_a_package_loads_the_layer_only(module, framework):
    if framework:
        pytest.importorskip(framework)
    code = f"""
import sys
{f"import {framework}" if framework else ""}
before = set(sys.modules)
import {module}
new = sorted(set(sys.modules) - before)
print("\\n".join(new))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    application = tuple(f"cbam_multi.{b}.{m}" for b in ("torch", "jax") for m in ("train", "models", "distributed", "sharding"))
    forbidden = [m for m in out if m in ("urllib.request", "http.client") or m.startswith(("cbam_multi.training", *application))]
    assert not forbidden, f"import {module} also imported {forbidden}"
    assert module in out


def test_readme_layout_table_names_every_library_file():
    table = README[README.index("## Repository layout"):]
    listed = set(re.findall(r"^\| `([^`]+\.py)` \|", table, flags=re.M))
    files = set(_library_files())
    assert not files - listed, f"README's layout table lacks {sorted(files - listed)} (one line each)"
    assert not listed - files, f"README's layout table names files that do not exist: {sorted(listed - files)}"


def test_pyproject_installs_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]

    def folder(pkg: str) -> Path:
        parts = pkg.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in mapping:
                return ROOT / mapping[".".join(parts[:i])] / Path(*parts[i:])
        raise AssertionError(f"{pkg}: no package-dir entry")

    listed = set(config["packages"])
    for pkg in listed:
        assert (folder(pkg) / "__init__.py").is_file(), f"pyproject lists {pkg}, which has no __init__.py"
    found = set()
    for top, root_pkg in (("cbam_multi", "cbam_multi"), ("backends/torch", "cbam_multi.torch"), ("backends/jax", "cbam_multi.jax")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            if top == "cbam_multi" and rel.parts[:1] in (("torch",), ("jax",)):
                continue
            found.add(".".join((root_pkg, *rel.parts)))
    assert found == listed, f"pyproject packages differ from the tree: missing {sorted(found - listed)}, extra {sorted(listed - found)}"


def test_ci_runs_the_readme_test_command_verbatim():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in README
    assert "ruff check ." in ci_command and "-n auto" in ci_command


@pytest.mark.parametrize("path", _library_files())
def test_public_names_are_listed_and_exist(path):
    """Every package states its public API in ``__all__``, and each name in a module's ``__all__`` exists."""
    tree = ast.parse((ROOT / path).read_text())
    names = [n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)]
    if path.endswith("__init__.py"):
        assert names, f"{path}: a package without __all__"
    if names:
        declared = ast.literal_eval(names[0].value)
        defined = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.Assign):
                defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined.add(node.target.id)
        missing = [n for n in declared if n not in defined]
        assert not missing, f"{path}: __all__ names {missing}, which the module does not define"
