"""Imports run one way (README, How it is built), read from the source of every module
of the package: module-level, function-level and TYPE_CHECKING imports alike.

    protos, foundation (errors, oci, mountinfo)   import nothing above them
    criu, cuda, api                                protos and the foundation
    runtime                                        protos and the foundation
    shim                                           runtime, criu, api (never agent, never cuda)
    agent                                          runtime, criu, cuda, api (never shim)
    sandbox                                        the shim's flags and template names
    cli                                            anything: it is the top

Also read here: no product module calls `asyncio.wait_for` (on 3.11 it swallows a
cancellation that arrives as the awaited thing completes; `asyncio.timeout` does not),
and the shim's side never imports boto3 or the CUDA bindings, and grpc only inside
functions (the agent client loads it on first use).
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Subpackage prefix -> layer; the longest prefix wins.
LAYER_OF_PREFIX = {
    "kybernate": "foundation",
    "kybernate.__main__": "cli",  # `python -m kybernate`: the command line's entry
    "kybernate.protos": "protos",
    "kybernate.criu": "criu",
    "kybernate.cuda": "cuda",
    "kybernate.api": "api",
    "kybernate.runtime": "runtime",
    "kybernate.shim": "shim",
    "kybernate.agent": "agent",
    "kybernate.sandbox": "sandbox",
    "kybernate.cli": "cli",
}
#: Layer -> the layers it may import (itself included).
ALLOWED = {
    "foundation": {"foundation"},
    "protos": {"protos"},
    "criu": {"criu", "protos", "foundation"},
    "cuda": {"cuda", "protos", "foundation"},
    "api": {"api", "protos", "foundation"},
    "runtime": {"runtime", "protos", "foundation"},
    "shim": {"shim", "runtime", "criu", "api", "protos", "foundation"},
    "agent": {"agent", "runtime", "criu", "cuda", "api", "protos", "foundation"},
    "sandbox": {"sandbox", "shim", "protos", "foundation"},
    "cli": set(LAYER_OF_PREFIX.values()),
}
#: Layers a container's shim process loads: no S3 client, no CUDA, grpc only on demand.
SHIM_SIDE = {"shim", "runtime", "criu", "api", "protos", "foundation"}
NEVER_ON_THE_SHIM_SIDE = ("boto3", "botocore", "cuda", "pynvml", "prometheus_client")


@dataclass(frozen=True)
class Import:
    module: str
    line: int
    in_function: bool


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def package_dirs() -> dict[str, Path]:
    """pyproject's package-dir: import name -> folder."""
    with open(REPO / "pyproject.toml", "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in mapping.items()}


def product_modules() -> list[Module]:
    dirs = package_dirs()
    owned = {folder.resolve(): name for name, folder in dirs.items()}
    modules = []
    for name, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            # A folder that is another subpackage's (core/ holds only kybernate's own
            # files, but a nested mapped folder would be listed twice otherwise).
            owner = next(p for p in [path.parent, *path.parent.parents] if p.resolve() in owned)
            if owned[owner.resolve()] != name:
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            dotted = ".".join([name, *[p for p in parts if p != "__init__"]])
            modules.append(Module(dotted, path, ast.parse(path.read_text(), str(path))))
    return modules


def imports_of(module: Module, known: set[str]) -> Iterator[Import]:
    """Every kybernate module `module` imports, wherever the import statement stands.
    `from X import name` counts as importing X.name when that is a module."""
    functions = [n for n in ast.walk(module.tree)
                 if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)]
    inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(module.tree):
        in_function = id(node) in inside
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno, in_function)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".")
                if not module.is_package:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                yield Import(candidate if candidate in known else source, node.lineno, in_function)


def layer_of(module: str) -> str | None:
    best = None
    for prefix in LAYER_OF_PREFIX:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return LAYER_OF_PREFIX[best] if best is not None else None


MODULES = product_modules()
KNOWN = {m.name for m in MODULES}


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 50
    assert [m.name for m in MODULES if layer_of(m.name) is None] == []


def test_foundation_is_errors_oci_and_pure_helpers() -> None:
    assert sorted(m.name for m in MODULES if layer_of(m.name) == "foundation") == [
        "kybernate", "kybernate.errors", "kybernate.mountinfo", "kybernate.oci"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_run_one_way(layer: str) -> None:
    wrong = []
    for module in (m for m in MODULES if layer_of(m.name) == layer):
        for imported in imports_of(module, KNOWN):
            target = layer_of(imported.module)
            if target is not None and target not in ALLOWED[layer]:
                wrong.append(f"{module.path.relative_to(REPO)}:{imported.line}: {module.name} "
                             f"({layer}) imports {imported.module} ({target})")
    assert wrong == []


def test_no_product_module_calls_asyncio_wait_for() -> None:
    calls = []
    for module in MODULES:
        for node in ast.walk(module.tree):
            named = (isinstance(node, ast.Attribute) and node.attr == "wait_for"
                     and isinstance(node.value, ast.Name) and node.value.id == "asyncio")
            imported = (isinstance(node, ast.ImportFrom) and node.module == "asyncio"
                        and any(alias.name == "wait_for" for alias in node.names))
            if named or imported:
                calls.append(f"{module.path.relative_to(REPO)}:{node.lineno}")
    assert calls == [], "use `async with asyncio.timeout(...)`: 3.11's wait_for loses cancellations"


def loads_grpc(module: str) -> bool:
    """grpc itself, or the generated gRPC stubs (which import it)."""
    return module.split(".")[0] == "grpc" or module.endswith("_pb2_grpc")


def test_the_shim_side_loads_no_s3_client_no_cuda_and_grpc_only_on_demand() -> None:
    wrong = []
    shim_side = (m for m in MODULES if layer_of(m.name) in SHIM_SIDE and not loads_grpc(m.name))
    for module in shim_side:
        for imported in imports_of(module, KNOWN):
            top = imported.module.split(".")[0]
            if top in NEVER_ON_THE_SHIM_SIDE or (loads_grpc(imported.module) and not imported.in_function):
                wrong.append(f"{module.path.relative_to(REPO)}:{imported.line}: {imported.module}")
    assert wrong == []


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..agent import pipeline\n"
        "if TYPE_CHECKING:\n"
        "    from kybernate.shim.service import TaskService\n"
        "def later():\n"
        "    import kybernate.cuda.driver\n"
        "    from kybernate import mountinfo\n"
    )
    path = tmp_path / "example.py"
    path.write_text(source)
    module = Module("kybernate.runtime.example", path, ast.parse(source))
    known = {"kybernate.runtime.sibling", "kybernate.agent.pipeline", "kybernate.mountinfo"}
    found = {(i.module, i.in_function) for i in imports_of(module, known)}
    assert found >= {("kybernate.runtime.sibling", False), ("kybernate.agent.pipeline", False),
                     ("kybernate.shim.service", False), ("kybernate.cuda.driver", True),
                     ("kybernate.mountinfo", True)}
    assert [layer_of(m) for m, _ in sorted(found) if m.startswith("kybernate")] == [
        "agent", "cuda", "foundation", "runtime", "shim"]
