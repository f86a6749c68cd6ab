"""Packaging: the wheel holds one top-level package with every module and its data, builds without setuptools
warnings, and code that needs a missing optional dependency names the extra that provides it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sdt_diffusion.tools import decay_maps, demo
from sdt_diffusion.utils.optional import import_optional

REPO = Path(__file__).resolve().parent.parent
# Not part of the source: environments, build outputs, caches.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "outputs",
                                     ".pytest_cache", ".ruff_cache")
# Printed by distutils when the environment disables byte-code (PYTHONDONTWRITEBYTECODE): not about the project.
_ENVIRONMENT_NOTES = ("byte-compiling is disabled",)


@dataclass
class Build:
    source: Path
    wheel: Path
    log: str


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Build:
    """Build the wheel once from a clean copy (so no stale ``build/`` folder leaks into it), offline."""
    source = tmp_path_factory.mktemp("src") / "sdt-diffusion"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    out = source.parent / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "--no-index", str(source), "-w", str(out)], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (wheel,) = out.glob("sdt_diffusion-*.whl")
    return Build(source, wheel, log)


def test_wheel_layout(build):
    names = set(zipfile.ZipFile(build.wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sdt_diffusion"}  # no generic top-level names such as training, eval or pipelines
    expected = {"sdt_diffusion/" + p.relative_to(build.source / "sdt_diffusion").as_posix()
                for p in (build.source / "sdt_diffusion").rglob("*") if p.suffix in (".py", ".json")}
    expected |= {f"sdt_diffusion/pipelines/{p.name}" for p in (build.source / "pipelines").glob("*.py")}
    assert "sdt_diffusion/utils/imagenet_classes.json" in expected
    assert expected <= names, f"missing from the wheel (add the package to pyproject.toml): {expected - names}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(build.wheel).read(entry_points).decode()
    for script in ("sdt-sample", "sdt-visualize", "sdt-fid-sample", "sdt-fid", "sdt-classify"):
        assert f"{script} = " in text, f"{script} missing from the wheel's entry points:\n{text}"
    metadata = zipfile.ZipFile(build.wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_wheel_build_prints_no_setuptools_warning(build):
    warnings = [line for line in build.log.splitlines()
                if ("warning" in line.lower()) and not any(note in line for note in _ENVIRONMENT_NOTES)]
    assert not warnings, "\n".join(warnings)


def test_import_from_another_directory(tmp_path):
    code = "import sdt_diffusion, sdt_diffusion.pipelines as p; print(sdt_diffusion.SDTTransformer2DModel.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "SDTTransformer2DModel"


def test_missing_optional_dependency_names_its_extra(monkeypatch, tmp_path):
    for name in ("matplotlib", "matplotlib.pyplot", "sklearn", "sklearn.datasets", "sklearn.svm"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    maps = decay_maps.DecayMaps(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), (0, 0), 0, 0, "cdsf")
    with pytest.raises(ImportError, match=r"pip install 'sdt-diffusion\[demo\]' \(or pip install matplotlib\)"):
        decay_maps.plot_decay_maps(maps, tmp_path / "maps.png")
    with pytest.raises(ImportError, match=r"pip install 'sdt-diffusion\[demo\]'"):
        demo.plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    with pytest.raises(ImportError, match=r"sdt-diffusion\[demo\]' \(or pip install scikit-learn\)"):
        import_optional("sklearn.datasets", "demo")
    assert not (tmp_path / "maps.png").exists() and not (tmp_path / "loss.png").exists()


def test_import_optional_keeps_errors_inside_an_installed_package(monkeypatch):
    assert import_optional("json", "demo") is sys.modules["json"]
    monkeypatch.setitem(sys.modules, "sdt_test_missing_dependency", None)
    with pytest.raises(ImportError, match=r"sdt-diffusion\[eval\]"):
        import_optional("sdt_test_missing_dependency.sub", "eval")
    # An installed package whose own dependency is missing keeps Python's message (naming that dependency).
    error = ModuleNotFoundError("No module named 'other'", name="other")
    monkeypatch.setattr("importlib.import_module", lambda name: (_ for _ in ()).throw(error))
    with pytest.raises(ModuleNotFoundError, match="other") as info:
        import_optional("sdt_test_pkg", "eval")
    assert "sdt-diffusion" not in str(info.value)


def test_every_library_module_with_a_main_runs_under_python_m():
    """Scripts and benchmarks launch library modules with ``python -m``: a module whose ``main`` is never called
    there would import, do nothing and exit 0 (as the FID sampler once did under benchmarks/ablation.py)."""
    import re

    package = REPO / "sdt_diffusion"
    silent = [str(path.relative_to(package)) for path in sorted(package.rglob("*.py"))
              if re.search(r"^def main\(", path.read_text(), re.M) and "__main__" not in path.read_text()]
    assert silent == []


# ------------------------------------------------------------------------------------------ console scripts
def _console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: script name -> ``module:function``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_resolves_to_a_callable():
    import importlib

    scripts = _console_scripts()
    for name in ("sdt-sample", "sdt-visualize", "sdt-fid-sample", "sdt-fid", "sdt-classify"):
        assert name in scripts, f"{name} is not a console script in pyproject.toml"
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert function, f"{name} = {target!r} names no function"
        entry = getattr(importlib.import_module(module), function, None)
        assert callable(entry), f"{name} = {target!r} does not resolve to a callable"


# Every command module of the sampling / evaluation / visualisation jobs, as run with ``python -m``, and the
# program name its --help shows (the console script's).
COMMAND_MODULES = {
    ("sdt_diffusion.tools.cli", "sample"): "sdt-sample",
    ("sdt_diffusion.tools.cli", "visualize"): "sdt-visualize",
    ("sdt_diffusion.evaluation.sampling",): "sdt-fid-sample",
    ("sdt_diffusion.evaluation.evaluate",): "sdt-fid",
    ("sdt_diffusion.evaluation.classification",): "sdt-classify",
}


@pytest.mark.parametrize("command", list(COMMAND_MODULES), ids=" ".join)
def test_python_m_help_of_every_command_module(command):
    module, *sub = command
    proc = subprocess.run([sys.executable, "-m", module, *sub, "--help"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"usage: {COMMAND_MODULES[command]} "), proc.stdout[:300]
    assert "Warning" not in proc.stderr, proc.stderr  # e.g. runpy's "found in sys.modules" (a double import)


def test_python_m_cli_names_its_commands():
    from sdt_diffusion.tools import cli

    proc = subprocess.run([sys.executable, "-m", "sdt_diffusion.tools.cli", "--help"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and "{sample,visualize}" in proc.stdout, proc.stderr[-3000:]
    assert cli.main(["draw"]) == 2 and cli.main([]) == 2


def _command_parsers():
    from sdt_diffusion.evaluation import classification, evaluate, sampling
    from sdt_diffusion.tools import cli

    return [cli.build_sample_parser(), cli.build_visualize_parser(), sampling.build_parser(), evaluate.build_parser(),
            classification.build_parser()]


@pytest.mark.parametrize("index", range(5))
def test_every_flag_with_a_default_shows_it_in_help(index):
    import argparse

    parser = _command_parsers()[index]
    for action in parser._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS or action.default is None
                or action.default is argparse.SUPPRESS or isinstance(action.default, bool)):
            continue
        assert f"default {action.default}" in (action.help or ""), (
            f"{parser.prog} {action.option_strings[0]}: its help {action.help!r} does not show its default "
            f"{action.default!r}")


# ------------------------------------------------------------------------------------------ no import circle
def test_pipelines_import_first_in_a_fresh_interpreter():
    code = ("import sdt_diffusion.pipelines.pipeline_sdt as m, sdt_diffusion; "
            "print(m.SDTPipeline is sdt_diffusion.SDTPipeline, sorted(m.PUBLIC_COMPONENT_CLASSES))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "True ['SDTTransformer2DModel']"


def test_no_pipeline_module_imports_the_whole_package():
    """``sdt_diffusion/__init__`` imports the pipelines, so they import what they need by name from submodules:
    ``import sdt_diffusion`` or ``from sdt_diffusion import X`` there would read a half-initialised package."""
    import ast

    files = sorted((REPO / "pipelines").glob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                whole = [a.name for a in node.names if a.name == "sdt_diffusion"]
                assert not whole, f"{path.name}:{node.lineno} does `import sdt_diffusion`"
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module != "sdt_diffusion", f"{path.name}:{node.lineno} imports from sdt_diffusion itself"
            if isinstance(node, ast.ImportFrom) and node.level == 2 and not node.module:
                raise AssertionError(f"{path.name}:{node.lineno} imports from the package itself (from .. import)")


def test_component_classes_named_in_model_index_are_exported_by_the_package():
    """``model_index.json`` names sdt-diffusion components as ``["sdt_diffusion", Class]``; diffusers loads them
    with ``getattr(sdt_diffusion, Class)``."""
    from sdt_diffusion.pipelines.pipeline_sdt import PUBLIC_COMPONENT_CLASSES

    import sdt_diffusion

    for name in PUBLIC_COMPONENT_CLASSES:
        assert isinstance(getattr(sdt_diffusion, name, None), type), f"sdt_diffusion does not export {name}"
