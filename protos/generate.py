"""Regenerate the Python modules of every protos/*.proto, or check they are current.

    python -m kybernate.protos.generate            # rewrite protos/*_pb2.py(i), *_pb2_grpc.py
    python -m kybernate.protos.generate --check    # exit 1 listing stale or missing files

Each .proto is compiled as ``kybernate/protos/<name>.proto``: that is the file name
registered in the descriptor pool (so our status.proto can never collide with
googleapis' google/rpc/status.proto by file name), the path other .proto files import
it by, and what makes protoc emit ``from kybernate.protos import X_pb2`` imports that
work inside the package. gRPC stubs are emitted only for the protos that serve over
grpcio (the node agent); the ttrpc services are dispatched by hand.

Task API v3 (`containerd.task.v3`, which containerd 2.x prefers) is v2 under another
package name, as containerd itself made it: its module is generated from shim.proto
with the package renamed (DERIVED_PROTOS), so the definition is written once.

Needs grpcio-tools (a test/development dependency, never imported at runtime).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
PACKAGE_PATH = Path("kybernate", "protos")
# Protos whose services are spoken over grpcio (the node agent; containerd's own API
# for `kybernate checkpoint create`) and so get *_pb2_grpc.py stubs.
GRPC_PROTOS = frozenset({"agent.proto", "containerd_containers.proto", "containerd_tasks.proto"})
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


@dataclass(frozen=True)
class DerivedProto:
    """A .proto made at generation from another by renaming its package."""

    source: str
    package: str
    renamed: str

    def text(self, source_text: str, name: str) -> str:
        line = f"package {self.package};"
        if source_text.count(line) != 1:
            raise GenerationError(f"{self.source} must declare `{line}` once to derive {name}")
        return source_text.replace(line, f"package {self.renamed};")


DERIVED_PROTOS = {
    "shim_v3.proto": DerivedProto("shim.proto", "containerd.task.v2", "containerd.task.v3"),
}


class GenerationError(RuntimeError):
    """protoc rejected a .proto file or produced something unexpected."""


@dataclass(frozen=True)
class Drift:
    """How the committed generated files differ from a fresh generation."""

    changed: tuple[str, ...]
    missing: tuple[str, ...]
    stale: tuple[str, ...]

    @property
    def clean(self) -> bool:
        return not (self.changed or self.missing or self.stale)

    def describe(self) -> str:
        lines = [f"changed: {name}" for name in self.changed]
        lines += [f"missing: {name}" for name in self.missing]
        lines += [f"stale (no .proto generates it): {name}" for name in self.stale]
        return "\n".join(lines)


def proto_sources(protos_dir: Path = PROTOS_DIR) -> list[Path]:
    """Every .proto of the package, in a stable order."""
    return sorted(protos_dir.glob("*.proto"))


def _well_known_include() -> Path:
    # grpc_tools ships the google/protobuf/*.proto files it was built with.
    return Path(str(resources.files("grpc_tools") / "_proto"))


def _run_protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # imported lazily: a development-only dependency

    # protoc.main() takes argv including a program name and returns protoc's exit code.
    code = protoc.main(["protoc", *args])
    if code != 0:
        raise GenerationError(f"protoc failed (exit {code}): protoc {' '.join(args)}")


def generate_into(out_dir: Path, protos_dir: Path = PROTOS_DIR) -> list[str]:
    """Compile every .proto of protos_dir and write the generated files flat into out_dir.

    Returns the names of the files written, sorted.
    """
    sources = proto_sources(protos_dir)
    if not sources:
        raise GenerationError(f"no .proto files in {protos_dir}")
    with tempfile.TemporaryDirectory(prefix="kybernate-protoc-") as scratch:
        scratch_dir = Path(scratch)
        # Stage the sources under kybernate/protos/ so protoc sees their package path.
        staged = scratch_dir / "src" / PACKAGE_PATH
        staged.mkdir(parents=True)
        for source in sources:
            shutil.copyfile(source, staged / source.name)
        names = [s.name for s in sources]
        for name, derived in DERIVED_PROTOS.items():
            if derived.source in names:
                source_text = (protos_dir / derived.source).read_text()
                (staged / name).write_text(derived.text(source_text, name))
                names.append(name)
        generated_root = scratch_dir / "out"
        generated_root.mkdir()
        common = [f"-I{scratch_dir / 'src'}", f"-I{_well_known_include()}"]
        plain = [str(PACKAGE_PATH / n) for n in sorted(names) if n not in GRPC_PROTOS]
        grpc = [str(PACKAGE_PATH / n) for n in sorted(names) if n in GRPC_PROTOS]
        if plain:
            _run_protoc(
                [*common, f"--python_out={generated_root}", f"--pyi_out={generated_root}", *plain]
            )
        if grpc:
            _run_protoc(
                [
                    *common,
                    f"--python_out={generated_root}",
                    f"--pyi_out={generated_root}",
                    f"--grpc_python_out={generated_root}",
                    *grpc,
                ]
            )
        produced_dir = generated_root / PACKAGE_PATH
        written: list[str] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for produced in sorted(produced_dir.iterdir()):
            _check_imports(produced)
            shutil.copyfile(produced, out_dir / produced.name)
            written.append(produced.name)
    return written


def _check_imports(generated: Path) -> None:
    """Refuse output whose imports would only work with protos/ on sys.path."""
    for line in generated.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("import ") and "_pb2" in stripped:
            raise GenerationError(f"{generated.name}: top-level import {stripped!r}")
        if stripped.startswith("from ") and "_pb2" in stripped:
            module = stripped.split()[1]
            if module != "kybernate.protos" and not module.startswith("google."):
                raise GenerationError(f"{generated.name}: unexpected import {stripped!r}")


def committed_generated_files(protos_dir: Path = PROTOS_DIR) -> list[str]:
    return sorted(
        p.name for p in protos_dir.iterdir() if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )


def check(protos_dir: Path = PROTOS_DIR) -> Drift:
    """Compare the committed generated files with a fresh generation."""
    with tempfile.TemporaryDirectory(prefix="kybernate-protos-check-") as fresh:
        fresh_dir = Path(fresh)
        expected = generate_into(fresh_dir, protos_dir)
        committed = set(committed_generated_files(protos_dir))
        changed = tuple(
            name
            for name in expected
            if name in committed
            and not filecmp.cmp(fresh_dir / name, protos_dir / name, shallow=False)
        )
    missing = tuple(name for name in expected if name not in committed)
    stale = tuple(sorted(committed - set(expected)))
    return Drift(changed=changed, missing=missing, stale=stale)


def regenerate(protos_dir: Path = PROTOS_DIR) -> list[str]:
    """Rewrite the generated files in place and delete ones no .proto produces any more."""
    written = generate_into(protos_dir, protos_dir)
    for name in committed_generated_files(protos_dir):
        if name not in written:
            (protos_dir / name).unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kybernate.protos.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and report differences",
    )
    parser.add_argument(
        "--protos-dir",
        type=Path,
        default=PROTOS_DIR,
        help="directory holding the .proto files (default: this package)",
    )
    args = parser.parse_args(argv)
    try:
        if args.check:
            drift = check(args.protos_dir)
            if not drift.clean:
                print(
                    "generated protobuf modules are out of date "
                    "(run python -m kybernate.protos.generate):",
                    file=sys.stderr,
                )
                print(drift.describe(), file=sys.stderr)
                return 1
            return 0
        for name in regenerate(args.protos_dir):
            print(f"wrote {args.protos_dir / name}")
    except GenerationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
