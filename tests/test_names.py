"""The repository's own import names: none may shadow an installed package.

The code runs from the repository root (nanoGPT style), so the root is first on sys.path and a
top-level `kernels.py` of ours is what `import kernels` finds, even inside transformers, which
imports the Hugging Face `kernels` package (transformers 5.25: 42 failures and 98 errors).
"""
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "steer"  # pyproject.toml's name


def top_level_names(root: Path) -> dict[str, str]:
    """Import name -> the file or folder of the repository's root that claims it."""
    names = {}
    for path in root.iterdir():
        if path.name.startswith((".", "_")):
            continue
        if path.is_file() and path.suffix == ".py":
            names[path.stem] = path.name
        elif path.is_dir() and any(path.glob("*.py")):  # a package, or a folder of scripts run by path
            names[path.name] = path.name + "/"
    return names


def shadowed(root: Path) -> list[str]:
    """'file: what it shadows' for every top-level name an installed distribution (or the standard
    library) also provides as an importable module."""
    installed = importlib.metadata.packages_distributions()  # import name -> distributions
    found = []
    for name, where in sorted(top_level_names(root).items()):
        others = [d for d in installed.get(name, []) if d != PROJECT]  # (an editable install names our own)
        if others:
            found.append(f"{where} shadows the installed package '{name}' ({', '.join(sorted(set(others)))})")
        elif name in sys.stdlib_module_names:
            found.append(f"{where} shadows the standard library module '{name}'")
    return found


def test_no_top_level_name_shadows_an_installed_package():
    clashes = shadowed(ROOT)
    assert not clashes, "rename: " + "; ".join(clashes)


def test_the_check_catches_a_shadowing_module(tmp_path):
    """The check itself can fail: a root holding `kernels.py` (what broke transformers 5.25) or any
    module named like an installed package (pytest, always here) is reported."""
    for name in ("model.py", "kernels.py", "pytest.py", "json.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "safetensors").mkdir()
    (tmp_path / "safetensors" / "__init__.py").write_text("")
    clashes = shadowed(tmp_path)
    assert any(c.startswith("pytest.py shadows") for c in clashes)
    assert any(c.startswith("safetensors/ shadows") for c in clashes)
    assert any(c.startswith("json.py shadows the standard library") for c in clashes)
    assert not any(c.startswith("model.py") for c in clashes)
    if "kernels" in importlib.metadata.packages_distributions():  # transformers >= 5.25 pulls it in
        assert any(c.startswith("kernels.py shadows") for c in clashes)
