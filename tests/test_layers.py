"""The layer contracts in pyproject.toml ([tool.importlinter], checked by scripts/lint.sh before the tests): the core's
list must name every core module, or a new one would escape the "core knows no stage" contract unnoticed."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_contract_names_every_core_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "forbidden")
    core = {f"align.{p.stem}" for p in (ROOT / "align").glob("*.py") if p.stem not in ("__init__", "__main__")}
    core |= {f"align.{p.parent.name}" for p in (ROOT / "align").glob("*/__init__.py")}
    assert set(contract["source_modules"]) == core
    assert set(contract["forbidden_modules"]) == {"align.cli", "align.stages", "align.labeling"}


def test_the_layer_folders_are_the_installed_packages():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = config["tool"]["setuptools"]["package-dir"]
    assert folders == {"align.stages": "stages", "align.labeling": "labeling", "align.cli": "cli"}
    packages = set(config["tool"]["setuptools"]["packages"])
    for package, folder in {"align": "align", **folders}.items():  # and every sub-package in those folders
        for init in (ROOT / folder).rglob("__init__.py"):
            sub = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((package, *sub)) in packages, init
