"""The layers of the package (imports point down), where experiments/ sits among them, and the
deprecated locakd.benchmarks alias.

Layers, lowest first: errors/_validation; calibration; losses; teachers/distiller; config; engine;
data/models; image/lm; experiments; demo; cli and hf (the Hugging Face facade over lm/, a front end
like the CLI). A module imports only its own layer or lower ones (lazily or not), and never one of the
one-release re-export shims. Only demo and cli (and the alias package) may import experiments;
experiments imports neither of them; demo uses no private name of another module; nothing in the
package imports the top-level benchmarks/ folder (the suite program lives there, outside the package).
"""

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import locakd

PACKAGE = Path(locakd.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(absolute module, imported names) for every import statement of ``path``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((module, tuple(alias.name for alias in node.names)))
    return found


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def _top(name: str) -> str:
    """``locakd.experiments.runner`` -> ``experiments``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "locakd" else ""


# top-level name under locakd -> layer (lowest first). training/ and evaluation/ are one-release shims of
# engine/ and image/, benchmarks/ the deprecated alias of experiments/: each sits where what it re-exports is.
LAYERS = [
    {"errors", "_validation"},
    {"calibration"},
    {"losses"},
    {"teachers", "distiller"},
    {"config"},
    {"engine"},
    {"data", "models"},
    {"image", "lm", "training", "evaluation"},
    {"experiments", "benchmarks"},
    {"demo"},
    {"cli", "hf"},
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}
# re-export shims kept for one release: nothing in the package imports them (only they import their new homes)
SHIMS = ("locakd.lm.pipeline", "locakd.lm.tokenizer", "locakd.lm.tasks", "locakd.training", "locakd.evaluation",
         "locakd.benchmarks")


def _is_shim(name: str) -> bool:
    return any(name == shim or name.startswith(f"{shim}.") for shim in SHIMS)


def test_every_top_level_module_has_a_layer():
    names = {_top(_module_name(p)) for p in _sources()} - {""}
    assert names == set(LAYER_OF), names ^ set(LAYER_OF)


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    offenders = []
    for path in _sources():
        name = _module_name(path)
        if name == "locakd":  # the package's public API; `import locakd` stays light (tests/core)
            continue
        own = LAYER_OF[_top(name)]
        for module, _ in _imports(path):
            top = _top(module)
            if top and LAYER_OF[top] > own:
                offenders.append(f"{name} imports {module}")
    assert offenders == []


def test_no_module_imports_a_one_release_shim():
    offenders = [
        f"{_module_name(p)} imports {m}"
        for p in _sources()
        if not _is_shim(_module_name(p))
        for m, _ in _imports(p)
        if _is_shim(m)
    ]
    assert offenders == []


def test_only_demo_and_cli_import_experiments():
    allowed = {"experiments", "demo", "cli", "benchmarks"}
    offenders = [
        (_module_name(p), m)
        for p in _sources()
        if _top(_module_name(p)) not in allowed
        for m, _ in _imports(p)
        if _top(m) == "experiments"
    ]
    assert offenders == []


def test_experiments_import_nothing_above_them():
    offenders = [
        (_module_name(p), m)
        for p in (PACKAGE / "experiments").rglob("*.py")
        for m, _ in _imports(p)
        if _top(m) in {"demo", "cli", "benchmarks"}
    ]
    assert offenders == []


def test_demo_uses_no_private_names_and_nothing_above_it():
    for path in (PACKAGE / "demo.py", PACKAGE / "cli" / "demo.py"):
        for module, names in _imports(path):
            if _top(module) and module != _module_name(path):
                assert not [n for n in names if n.startswith("_")], (path.name, module, names)
            if path.name == "demo.py" and path.parent == PACKAGE:
                assert _top(module) not in {"cli", "benchmarks"}, module


def test_package_does_not_import_the_benchmark_programs():
    for path in _sources():
        for module, _ in _imports(path):
            assert module.split(".")[0] not in {"benchmarks", "suite", "run_suite"}, (path, module)
            assert "mnist1d_suite" not in module, (path, module)


def test_benchmarks_alias_reexports_experiments_with_a_deprecation_warning():
    for name in [m for m in sys.modules if m == "locakd.benchmarks" or m.startswith("locakd.benchmarks.")]:
        del sys.modules[name]
    with pytest.warns(DeprecationWarning, match="locakd.experiments"):
        alias = importlib.import_module("locakd.benchmarks")
    import locakd.experiments as experiments

    assert alias.__all__ == experiments.__all__
    for name in experiments.__all__:
        assert getattr(alias, name) is getattr(experiments, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for sub in ("runner", "stats", "plots", "mnist1d"):
            old = importlib.import_module(f"locakd.benchmarks.{sub}")
            new = importlib.import_module(f"locakd.experiments.{sub}")
            assert old.__all__ == new.__all__
            for name in new.__all__:
                assert getattr(old, name) is getattr(new, name), (sub, name)
    assert not (PACKAGE / "benchmarks" / "mnist1d_suite.py").exists()
