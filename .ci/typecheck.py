"""mypy over the package as it is installed: `kybernate.shim` from shim/, `kybernate`
from core/, and so on, as pyproject's package-dir maps them.

mypy has no folder-to-package mapping of its own and cannot see through the editable
install's import hook, so this lays the package out as links under build/typecheck/
(the folders themselves, and core/'s files one by one), runs mypy there with
pyproject's [tool.mypy] settings, and prints the findings with the repository's own
paths. Exit status: mypy's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TREE = REPO / "build" / "typecheck"


def package_dirs() -> dict[str, str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"]["package-dir"])


def lay_out(mapping: dict[str, str]) -> dict[str, str]:
    """Link every folder where its import name puts it; returns tree path -> repo path
    prefixes for translating mypy's output back."""
    shutil.rmtree(TREE, ignore_errors=True)
    back: dict[str, str] = {}
    for name, folder in sorted(mapping.items(), key=lambda item: item[0].count(".")):
        target = TREE.joinpath(*name.split("."))
        source = REPO / folder
        if name == "kybernate":
            # The top package's folder holds its own modules only: link them one by one,
            # so that the subpackages' links can sit beside them.
            target.mkdir(parents=True)
            for path in sorted(source.iterdir()):
                if path.suffix in (".py", ".pyi"):
                    (target / path.name).symlink_to(path)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source, target_is_directory=True)
        back[str(target.relative_to(TREE)) + "/"] = folder + "/"
    return back


def stale_generated_list() -> list[str]:
    """Differences between the generated modules pyproject exempts and protos/'s."""
    with open(REPO / "pyproject.toml", "rb") as f:
        overrides = tomllib.load(f)["tool"]["mypy"]["overrides"]
    listed = {m for o in overrides if o.get("ignore_errors") for m in o["module"] if m.endswith("_pb2")}
    present = {f"kybernate.protos.{p.stem}" for p in (REPO / "protos").glob("*_pb2.pyi")}
    return sorted(listed ^ present)


def main() -> int:
    stale = stale_generated_list()
    if stale:
        print(f"pyproject.toml: the generated modules exempt from mypy differ from protos/: {stale}")
        return 1
    back = lay_out(package_dirs())
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(REPO / "build" / "mypy-cache"), "-p", "kybernate"],
        cwd=TREE, capture_output=True, text=True, env={**os.environ, "MYPY_FORCE_COLOR": "0"},
        check=False)
    # Longest prefix first: kybernate/shim/ before kybernate/.
    pattern = re.compile("^(" + "|".join(re.escape(p) for p in sorted(back, key=len, reverse=True)) + ")",
                         re.MULTILINE)
    output = pattern.sub(lambda m: back[m.group(1)], result.stdout + result.stderr)
    print(output, end="")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
