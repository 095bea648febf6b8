"""The protobuf modules of kybernate.protos: current, wire-compatible, and usable.

Wire compatibility is checked against the .proto files of each containerd we support,
1.7 and 2.x, taken from the Debian packages each was built from (containerd's API,
cgroups metrics, ttrpc) and of CRIU's RPC as go-criu carries it. `.ci/install-system.sh`
unpacks those packages into /opt/kybernate/upstream (one directory per source, nothing
installed), so whatever golang-*-dev packages the system has do not matter. The files
are compiled with protoc here and compared field by field with the descriptors our
generated modules register. They are a required part of the test environment.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TypeAlias

import pytest
from google.protobuf import any_pb2, descriptor_pb2, text_format, timestamp_pb2, unknown_fields
from google.protobuf.message import EncodeError, Message
from kybernate.protos import (
    cgroups_v1_metrics_pb2,
    cgroups_v2_metrics_pb2,
    containerd_containers_pb2,
    containerd_tasks_pb2,
    content_descriptor_pb2,
    criu_rpc_pb2,
    events_pb2,
    events_ttrpc_pb2,
    generate,
    mount_pb2,
    runc_options_pb2,
    runctypes_pb2,
    runtimeoptions_pb2,
    shim_pb2,
    shim_v3_pb2,
    status_pb2,
    task_types_pb2,
    ttrpc_pb2,
)

UPSTREAM = Path("/opt/kybernate/upstream")
WELL_KNOWN_INCLUDE = Path(str(resources.files("grpc_tools") / "_proto"))
PROTOS_DIR = Path(generate.__file__).resolve().parent

FieldProto: TypeAlias = descriptor_pb2.FieldDescriptorProto
Members: TypeAlias = frozenset[tuple[str, str]]


# --------------------------------------------------------------------------------------
# Upstream descriptors
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """The .proto files of one source, unpacked from its Debian packages."""

    name: str  # its directory under UPSTREAM

    @property
    def gocode(self) -> Path:
        return UPSTREAM / self.name / "usr/share/gocode/src"

    def include_dirs(self) -> list[Path]:
        # ttrpc's request.proto imports its status stub as "proto/status.proto".
        return [self.gocode, self.gocode / "github.com/containerd/ttrpc"]

    def packages(self) -> str:
        """The packages and versions unpacked (install-system.sh writes the list last)."""
        listing = UPSTREAM / self.name / "PACKAGES"
        assert listing.is_file(), f"{listing} is missing: run .ci/install-system.sh"
        return listing.read_text()


CONTAINERD_1_7 = Upstream("containerd-1.7")
CONTAINERD_2 = Upstream("containerd-2")
COMMON = Upstream("common")


@dataclass(frozen=True)
class Mirror:
    """One upstream .proto file and the generated module of ours that mirrors it."""

    module: ModuleType
    source: Upstream
    upstream: str  # path relative to the source's gocode, as upstream imports it
    # Members ours has beyond this upstream file: newer ones ours follows, or older ones
    # ours keeps for another containerd. {(full name of the scope, member name)}.
    not_upstream: Members = frozenset()
    # Types upstream moved unchanged into another file and package:
    # {their full name: ours}. Each is compared with its new upstream definition.
    moved: Mapping[str, str] = field(default_factory=dict)
    # Ours mirrors only some of upstream's messages and rpcs (a client's part of a
    # service): those are compared, and only those.
    subset: bool = False

    @property
    def id(self) -> str:
        return f"{self.source.name}:{self.module.__name__.rsplit('.', 1)[-1]}"


CONTAINERD = "github.com/containerd/containerd"
CGROUPS = "github.com/containerd/cgroups"
TTRPC = "github.com/containerd/ttrpc"

CRIU_4X_ADDITIONS = frozenset(
    {
        ("criu.criu_opts", "network_lock"),
        ("criu.criu_opts", "mntns_compat_mode"),
        ("criu.criu_opts", "skip_file_rwx_check"),
        ("criu.criu_opts", "unprivileged"),
        ("criu.criu_opts", "images_dir"),
        ("criu.criu_opts", "leave_stopped"),
        ("criu.criu_opts", "display_stats"),
        ("criu.criu_opts", "log_to_stderr"),
        ("criu.criu_req_type", "SINGLE_PRE_DUMP"),
        ("criu", "criu_network_lock_method"),
    }
)
# containerd 2.x's sandbox API hints; 1.7 has no such fields.
RUNC_OPTIONS_2X = frozenset(
    {("containerd.runc.v1.Options", "task_api_address"),
     ("containerd.runc.v1.Options", "task_api_version")}
)
# ttrpc declares only the code of its Status; the Go type is google.rpc.Status, which
# ours mirrors whole (compared with googleapis' definition in COMMON).
TTRPC_STATUS_STUB = frozenset(
    {("google.rpc.Status", "message"), ("google.rpc.Status", "details")}
)


def containerd_mirrors(source: Upstream) -> tuple[Mirror, ...]:
    """Our files against one containerd's: the API moved between 1.7 and 2.x."""
    is_2x = source is CONTAINERD_2
    cgroups = f"{CGROUPS}/v3" if is_2x else CGROUPS
    return (
        Mirror(mount_pb2, source, f"{CONTAINERD}/api/types/mount.proto"),
        Mirror(task_types_pb2, source, f"{CONTAINERD}/api/types/task/task.proto"),
        Mirror(shim_pb2, source, f"{CONTAINERD}/api/runtime/task/v2/shim.proto"),
        Mirror(shim_v3_pb2, source, f"{CONTAINERD}/api/runtime/task/v3/shim.proto"),
        Mirror(events_pb2, source, f"{CONTAINERD}/api/events/task.proto"),
        Mirror(
            events_ttrpc_pb2,
            source,
            f"{CONTAINERD}/api/services/ttrpc/events/v1/events.proto",
            # 2.x moved the envelope to api/types/event.proto.
            moved={"containerd.types.Envelope": "containerd.services.events.ttrpc.v1.Envelope"}
            if is_2x
            else {},
        ),
        Mirror(
            runc_options_pb2,
            source,
            f"{CONTAINERD}/api/types/runc/options/oci.proto"
            if is_2x
            else f"{CONTAINERD}/runtime/v2/runc/options/oci.proto",
            # 2.x reserves criu_path's number; 1.7 lacks the task API hints.
            not_upstream=frozenset({("containerd.runc.v1.Options", "criu_path")})
            if is_2x
            else RUNC_OPTIONS_2X,
        ),
        Mirror(runctypes_pb2, source, f"{CONTAINERD}/runtime/linux/runctypes/runc.proto"),
        Mirror(
            runtimeoptions_pb2,
            source,
            f"{CONTAINERD}/api/types/runtimeoptions/v1/api.proto"
            if is_2x
            else f"{CONTAINERD}/pkg/runtimeoptions/v1/api.proto",
        ),
        Mirror(cgroups_v1_metrics_pb2, source, f"{cgroups}/cgroup1/stats/metrics.proto"),
        Mirror(cgroups_v2_metrics_pb2, source, f"{cgroups}/cgroup2/stats/metrics.proto"),
        Mirror(ttrpc_pb2, source, f"{TTRPC}/request.proto",
               moved={"Status": "google.rpc.Status"}, not_upstream=TTRPC_STATUS_STUB),
        Mirror(content_descriptor_pb2, source, f"{CONTAINERD}/api/types/descriptor.proto"),
        Mirror(containerd_containers_pb2, source,
               f"{CONTAINERD}/api/services/containers/v1/containers.proto", subset=True),
        Mirror(containerd_tasks_pb2, source, f"{CONTAINERD}/api/services/tasks/v1/tasks.proto",
               subset=True),
    )


MIRRORS = (
    *containerd_mirrors(CONTAINERD_1_7),
    *containerd_mirrors(CONTAINERD_2),
    Mirror(status_pb2, COMMON, "github.com/gogo/googleapis/google/rpc/status.proto"),
    # go-criu's copy of CRIU's rpc.proto; it is older than CRIU 4.x.
    Mirror(
        criu_rpc_pb2,
        COMMON,
        "github.com/checkpoint-restore/go-criu/rpc/rpc.proto",
        not_upstream=CRIU_4X_ADDITIONS,
    ),
)
SHIM_V2_1_7 = MIRRORS[2]
assert SHIM_V2_1_7.module is shim_pb2 and SHIM_V2_1_7.source is CONTAINERD_1_7


def _missing_upstream_files() -> list[str]:
    wanted = [m.source.gocode / m.upstream for m in MIRRORS]
    wanted.append(COMMON.gocode / "github.com/gogo/protobuf/gogoproto/gogo.proto")
    return [str(p) for p in wanted if not p.is_file()]


def _protoc(source: Upstream, *args: str, stdin: bytes | None = None) -> bytes:
    """Run protoc (from grpcio-tools) with the source's include paths."""
    includes = [f"-I{d}" for d in source.include_dirs()]
    if source is COMMON:
        includes.append(f"-I{COMMON.gocode / 'github.com/gogo/protobuf'}")  # gogoproto/gogo.proto
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *includes, f"-I{WELL_KNOWN_INCLUDE}", *args],
        input=stdin,
        capture_output=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise AssertionError(f"protoc {' '.join(args)} failed: {result.stderr.decode()}")
    return result.stdout


@dataclass(frozen=True)
class UpstreamFile:
    """An upstream file compiled, with the messages of the files it imports."""

    file: descriptor_pb2.FileDescriptorProto
    imported_messages: Mapping[str, descriptor_pb2.DescriptorProto]


@pytest.fixture(scope="module")
def upstream_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, UpstreamFile]:
    """Every mirror's upstream file, by Mirror.id."""
    missing = _missing_upstream_files()
    assert not missing, (
        "upstream .proto files needed for the wire-compatibility test are not unpacked "
        f"(run .ci/install-system.sh): {missing}"
    )
    out_dir = tmp_path_factory.mktemp("upstream")
    files: dict[str, UpstreamFile] = {}
    # One protoc run per file: gogo-era files import gogo.proto under two different
    # paths, which protoc refuses to load into one run.
    for index, mirror in enumerate(MIRRORS):
        out = out_dir / f"{index}.pb"
        _protoc(mirror.source, "--include_imports", f"--descriptor_set_out={out}",
                mirror.upstream)
        compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
        main = next(f for f in compiled if f.name == mirror.upstream)
        imported = {
            name: message
            for dependency in compiled
            if dependency.name != mirror.upstream
            for name, message in _collect(dependency).messages.items()
        }
        files[mirror.id] = UpstreamFile(main, imported)
    return files


def test_upstream_sources_are_the_supported_containerd_releases() -> None:
    # What the comparisons below are against: containerd 1.7 and 2.x, as Debian built them.
    assert "golang-github-containerd-containerd-dev 1.7." in CONTAINERD_1_7.packages()
    listing = CONTAINERD_2.packages()
    assert "golang-github-containerd-containerd-api-dev 2." in listing
    assert "golang-github-containerd-containerd-dev 2." in listing


def our_file(module: ModuleType) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


# --------------------------------------------------------------------------------------
# Descriptor comparison
# --------------------------------------------------------------------------------------


@dataclass
class _Members:
    """Every message, enum and service of one file by full name (no leading dot)."""

    messages: dict[str, descriptor_pb2.DescriptorProto] = field(default_factory=dict)
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = field(default_factory=dict)
    services: dict[str, descriptor_pb2.ServiceDescriptorProto] = field(default_factory=dict)


def _collect(file: descriptor_pb2.FileDescriptorProto) -> _Members:
    members = _Members()
    prefix = f"{file.package}." if file.package else ""

    def walk_message(scope: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = scope + message.name
        members.messages[name] = message
        for nested in message.nested_type:
            walk_message(name + ".", nested)
        for enum in message.enum_type:
            members.enums[f"{name}.{enum.name}"] = enum

    for message in file.message_type:
        walk_message(prefix, message)
    for enum in file.enum_type:
        members.enums[prefix + enum.name] = enum
    for service in file.service:
        members.services[prefix + service.name] = service
    return members


def _renamer(
    theirs: descriptor_pb2.FileDescriptorProto, our_package: str, moved: Mapping[str, str]
) -> Callable[[str], str]:
    """Map full names of types upstream's file defines into our package, and of types
    upstream moved elsewhere to ours.

    Only CRIU's package differs (none upstream, `criu` here); names of other types, such
    as .google.protobuf.Any, pass through unchanged.
    """
    their_prefix = f"{theirs.package}." if theirs.package else ""
    members = _collect(theirs)
    local = set(members.messages) | set(members.enums) | set(members.services)

    def rename(name: str) -> str:
        absolute = name.startswith(".")
        bare = name[1:] if absolute else name
        if bare in moved:
            renamed = moved[bare]
        elif bare in local and theirs.package != our_package:
            renamed = f"{our_package}.{bare[len(their_prefix) :]}"
        else:
            return name
        return "." + renamed if absolute else renamed

    return rename


def _syntax(file: descriptor_pb2.FileDescriptorProto) -> str:
    return file.syntax or "proto2"


def compare_files(
    ours: descriptor_pb2.FileDescriptorProto,
    theirs: descriptor_pb2.FileDescriptorProto,
    not_upstream: Members = frozenset(),
    moved: Mapping[str, descriptor_pb2.DescriptorProto] | None = None,
    moved_names: Mapping[str, str] | None = None,
    ours_elsewhere: Mapping[str, descriptor_pb2.DescriptorProto] | None = None,
) -> list[str]:
    """Every wire-relevant difference between our file and upstream's, as readable lines.

    `moved_names` maps types upstream moved into another file to ours, `moved` holds
    their upstream definitions by upstream name; each is compared like a local one,
    with ours from `ours_elsewhere` when our file does not define it either."""
    problems: list[str] = []
    moved_names = moved_names or {}
    rename = _renamer(theirs, ours.package, moved_names)
    if _syntax(ours) != _syntax(theirs):
        # proto2 vs proto3 changes packing of repeated scalars and presence on the wire.
        problems.append(f"{ours.name}: syntax {_syntax(ours)} != upstream {_syntax(theirs)}")
    our_members, their_members = _collect(ours), _collect(theirs)

    def extra_allowed(scope: str, name: str) -> bool:
        return (scope, name) in not_upstream

    their_messages = {rename(k): v for k, v in their_members.messages.items()}
    for their_name, our_name in moved_names.items():
        definition = (moved or {}).get(their_name)
        if definition is None:
            problems.append(f"message {their_name}: moved, but not found upstream")
        else:
            their_messages[our_name] = definition
    our_messages = {**(ours_elsewhere or {}), **our_members.messages}
    for name, theirs_msg in their_messages.items():
        ours_msg = our_messages.get(name)
        if ours_msg is None:
            problems.append(f"message {name}: missing")
            continue
        problems += _compare_fields(name, ours_msg, theirs_msg, rename, extra_allowed)
    for name in our_members.messages.keys() - their_messages.keys():
        scope, _, short = name.rpartition(".")
        if not extra_allowed(scope, short):
            problems.append(f"message {name}: not in upstream")

    their_enums = {rename(k): v for k, v in their_members.enums.items()}
    for name, theirs_enum in their_enums.items():
        ours_enum = our_members.enums.get(name)
        if ours_enum is None:
            problems.append(f"enum {name}: missing")
            continue
        ours_values = {v.name: v.number for v in ours_enum.value}
        theirs_values = {v.name: v.number for v in theirs_enum.value}
        for value, number in theirs_values.items():
            if value not in ours_values:
                problems.append(f"enum {name}: value {value} missing")
            elif ours_values[value] != number:
                problems.append(f"enum {name}.{value}: number {ours_values[value]} != {number}")
        for value in ours_values.keys() - theirs_values.keys():
            if not extra_allowed(name, value):
                problems.append(f"enum {name}: value {value} not in upstream")
    for name in our_members.enums.keys() - their_enums.keys():
        scope, _, short = name.rpartition(".")
        if not extra_allowed(scope, short):
            problems.append(f"enum {name}: not in upstream")

    their_services = {rename(k): v for k, v in their_members.services.items()}
    for name in our_members.services.keys() | their_services.keys():
        problems += _compare_service(
            name, our_members.services.get(name), their_services.get(name), rename
        )
    return problems


def _compare_fields(
    message: str,
    ours: descriptor_pb2.DescriptorProto,
    theirs: descriptor_pb2.DescriptorProto,
    rename: Callable[[str], str],
    extra_allowed: Callable[[str, str], bool],
) -> list[str]:
    problems: list[str] = []
    ours_by_number = {f.number: f for f in ours.field}
    theirs_by_number = {f.number: f for f in theirs.field}
    for number, their_field in theirs_by_number.items():
        our_field = ours_by_number.get(number)
        where = f"{message}.{their_field.name} (= {number})"
        if our_field is None:
            problems.append(f"{where}: missing")
            continue
        checks = (
            ("name", our_field.name, their_field.name),
            ("type", FieldProto.Type.Name(our_field.type), FieldProto.Type.Name(their_field.type)),
            (
                "label",
                FieldProto.Label.Name(our_field.label),
                FieldProto.Label.Name(their_field.label),
            ),
            ("type_name", our_field.type_name, rename(their_field.type_name)),
        )
        for aspect, ours_value, theirs_value in checks:
            if ours_value != theirs_value:
                problems.append(f"{where}: {aspect} {ours_value!r} != upstream {theirs_value!r}")
    for number in ours_by_number.keys() - theirs_by_number.keys():
        name = ours_by_number[number].name
        if not extra_allowed(message, name):
            problems.append(f"{message}.{name} (= {number}): not in upstream")
    return problems


def _compare_service(
    name: str,
    ours: descriptor_pb2.ServiceDescriptorProto | None,
    theirs: descriptor_pb2.ServiceDescriptorProto | None,
    rename: Callable[[str], str],
) -> list[str]:
    if ours is None or theirs is None:
        return [f"service {name}: {'missing' if ours is None else 'not in upstream'}"]

    def signature(method: descriptor_pb2.MethodDescriptorProto, renamed: bool) -> tuple:
        fix = rename if renamed else (lambda n: n)
        return (
            fix(method.input_type),
            fix(method.output_type),
            method.client_streaming,
            method.server_streaming,
        )

    ours_methods = {m.name: signature(m, False) for m in ours.method}
    theirs_methods = {m.name: signature(m, True) for m in theirs.method}
    problems = []
    for method in sorted(ours_methods.keys() | theirs_methods.keys()):
        if ours_methods.get(method) != theirs_methods.get(method):
            problems.append(
                f"service {name}.{method}: {ours_methods.get(method)} "
                f"!= upstream {theirs_methods.get(method)}"
            )
    return problems


# --------------------------------------------------------------------------------------
# (a) the committed generated modules are what the generator makes
# --------------------------------------------------------------------------------------


def test_committed_modules_match_a_fresh_generation() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kybernate.protos.generate", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"drift in generated modules:\n{result.stderr}"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    names = generate.generate_into(first)
    assert names == generate.generate_into(second)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_check_reports_changed_missing_and_stale_files(protos_copy: Path) -> None:
    assert generate.check(protos_copy).clean
    with (protos_copy / "shim_pb2.py").open("a") as tampered:
        tampered.write("# edited by hand\n")
    (protos_copy / "mount_pb2.pyi").unlink()
    (protos_copy / "removed_pb2.py").write_text("# its .proto is gone\n")

    drift = generate.check(protos_copy)

    assert drift.changed == ("shim_pb2.py",)
    assert drift.missing == ("mount_pb2.pyi",)
    assert drift.stale == ("removed_pb2.py",)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kybernate.protos.generate",
            "--check",
            "--protos-dir",
            str(protos_copy),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    for name in ("shim_pb2.py", "mount_pb2.pyi", "removed_pb2.py"):
        assert name in result.stderr


def test_regenerate_repairs_drift_and_a_changed_proto_changes_the_output(
    protos_copy: Path,
) -> None:
    (protos_copy / "removed_pb2.py").write_text("# its .proto is gone\n")
    generate.regenerate(protos_copy)
    assert generate.check(protos_copy).clean
    assert not (protos_copy / "removed_pb2.py").exists()

    source = protos_copy / "mount.proto"
    source.write_text(source.read_text().replace("string target = 3;", "string target = 5;"))
    assert generate.check(protos_copy).changed == ("mount_pb2.py",)


def test_generator_rejects_a_broken_proto(protos_copy: Path) -> None:
    (protos_copy / "broken.proto").write_text(
        'syntax = "proto3";\nmessage Broken { nope x = 1; }\n'
    )
    with pytest.raises(generate.GenerationError):
        generate.generate_into(protos_copy / "out", protos_copy)


def test_task_api_v3_is_derived_from_shim_proto(protos_copy: Path) -> None:
    assert not (PROTOS_DIR / "shim_v3.proto").exists()  # written once, as shim.proto
    source = protos_copy / "shim.proto"
    source.write_text(source.read_text().replace("string exec_id = 2;", "string exec_id = 9;", 1))
    assert set(generate.check(protos_copy).changed) == {"shim_pb2.py", "shim_v3_pb2.py"}
    source.write_text(source.read_text().replace("package containerd.task.v2;", ""))
    with pytest.raises(generate.GenerationError, match="containerd.task.v2"):
        generate.generate_into(protos_copy / "out", protos_copy)


def test_generated_modules_import_each_other_through_the_package() -> None:
    for generated in sorted(PROTOS_DIR.glob("*_pb2*.py")):
        for line in generated.read_text().splitlines():
            if "_pb2" in line and line.startswith(("import ", "from ")):
                assert line.startswith(("from kybernate.protos import", "from google.protobuf")), (
                    f"{generated.name}: {line}"
                )


def test_importing_task_messages_stays_cheap() -> None:
    # The shim's start path imports these: no gRPC, no grpc_tools, no other kybernate code.
    probe = (
        "import json, sys; import kybernate.protos.shim_pb2, kybernate.protos.ttrpc_pb2, "
        "kybernate.protos.events_ttrpc_pb2, kybernate.protos.runc_options_pb2; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(result.stdout)
    assert not [m for m in loaded if m.split(".")[0] in ("grpc", "grpc_tools")], loaded
    # Only the modules asked for and their own imports (protos/__init__.py imports nothing).
    protos_modules = {m for m in loaded if m.startswith("kybernate.protos")}
    assert protos_modules == {
        "kybernate.protos",
        "kybernate.protos.mount_pb2",
        "kybernate.protos.task_types_pb2",
        "kybernate.protos.shim_pb2",
        "kybernate.protos.status_pb2",
        "kybernate.protos.ttrpc_pb2",
        "kybernate.protos.events_ttrpc_pb2",
        "kybernate.protos.runc_options_pb2",
    }


def test_status_is_registered_under_our_own_file_name() -> None:
    assert status_pb2.DESCRIPTOR.name == "kybernate/protos/status.proto"
    assert status_pb2.Status.DESCRIPTOR.full_name == "google.rpc.Status"
    assert ttrpc_pb2.Response.DESCRIPTOR.fields_by_name["status"].message_type is (
        status_pb2.Status.DESCRIPTOR
    )


# --------------------------------------------------------------------------------------
# (b) wire compatibility with the upstream definitions
# --------------------------------------------------------------------------------------


def compare_mirror(
    mirror: Mirror, upstream: UpstreamFile, not_upstream: Members | None = None,
    ours: descriptor_pb2.FileDescriptorProto | None = None,
) -> list[str]:
    pool = mirror.module.DESCRIPTOR.pool
    theirs = _trimmed_to(our_file(mirror.module), upstream.file) if mirror.subset else upstream.file
    ours_elsewhere = {}
    for our_name in mirror.moved.values():
        definition = descriptor_pb2.DescriptorProto()
        pool.FindMessageTypeByName(our_name).CopyToProto(definition)
        ours_elsewhere[our_name] = definition
    return compare_files(
        our_file(mirror.module) if ours is None else ours,
        theirs,
        mirror.not_upstream if not_upstream is None else not_upstream,
        upstream.imported_messages,
        mirror.moved,
        ours_elsewhere,
    )


def _trimmed_to(
    ours: descriptor_pb2.FileDescriptorProto, theirs: descriptor_pb2.FileDescriptorProto
) -> descriptor_pb2.FileDescriptorProto:
    """Upstream's file with only the top-level messages, enums, services and rpcs ours
    defines (by name): what a subset mirror is compared with."""
    trimmed = descriptor_pb2.FileDescriptorProto()
    trimmed.CopyFrom(theirs)
    for kind in ("message_type", "enum_type"):
        wanted = {item.name for item in getattr(ours, kind)}
        kept = [item for item in getattr(theirs, kind) if item.name in wanted]
        trimmed.ClearField(kind)
        getattr(trimmed, kind).extend(kept)
    our_methods = {service.name: {m.name for m in service.method} for service in ours.service}
    trimmed.ClearField("service")
    for service in theirs.service:
        if service.name in our_methods:
            copy = trimmed.service.add()
            copy.CopyFrom(service)
            copy.ClearField("method")
            copy.method.extend(m for m in service.method if m.name in our_methods[service.name])
    return trimmed


@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda m: m.id)
def test_matches_upstream_definition(
    mirror: Mirror, upstream_files: dict[str, UpstreamFile]
) -> None:
    problems = compare_mirror(mirror, upstream_files[mirror.id])
    assert problems == [], "\n".join(problems)
    # Each allowance must be needed: without them, exactly those members are reported.
    unexcused = compare_mirror(mirror, upstream_files[mirror.id], frozenset())
    assert len(unexcused) == len(mirror.not_upstream), unexcused
    assert all("not in upstream" in problem for problem in unexcused), unexcused


def test_task_api_v3_is_v2_under_another_package() -> None:
    # The shim decodes v3 calls with the v2 classes (shim/service.py): that is right
    # only while every message and rpc matches field for field.
    v2, v3 = our_file(shim_pb2), our_file(shim_v3_pb2)
    assert (v2.package, v3.package) == ("containerd.task.v2", "containerd.task.v3")

    def in_v3(name: str) -> str:
        return name.replace(".containerd.task.v2.", ".containerd.task.v3.")

    v2_renamed = descriptor_pb2.FileDescriptorProto()
    v2_renamed.CopyFrom(v2)
    v2_renamed.package = v3.package
    for message in v2_renamed.message_type:
        for each in message.field:
            each.type_name = in_v3(each.type_name)
    for method in v2_renamed.service[0].method:
        method.input_type, method.output_type = in_v3(method.input_type), in_v3(method.output_type)
    assert compare_files(v3, v2_renamed) == []
    assert [m.name for m in v3.message_type] == [m.name for m in v2.message_type]


def test_task_service_has_every_rpc() -> None:
    methods = [m.name for m in shim_pb2.DESCRIPTOR.services_by_name["Task"].methods]
    assert methods == [
        "State",
        "Create",
        "Start",
        "Delete",
        "Pids",
        "Pause",
        "Resume",
        "Checkpoint",
        "Kill",
        "Exec",
        "ResizePty",
        "CloseIO",
        "Update",
        "Wait",
        "Stats",
        "Connect",
        "Shutdown",
    ]


def _mutations() -> Iterator[tuple[str, Callable[[descriptor_pb2.FileDescriptorProto], None], str]]:
    def message(
        file: descriptor_pb2.FileDescriptorProto, name: str
    ) -> descriptor_pb2.DescriptorProto:
        return next(m for m in file.message_type if m.name == name)

    def field_of(file: descriptor_pb2.FileDescriptorProto, msg: str, name: str) -> FieldProto:
        return next(f for f in message(file, msg).field if f.name == name)

    def renumber(f: descriptor_pb2.FileDescriptorProto) -> None:
        field_of(f, "KillRequest", "signal").number = 7

    def retype(f: descriptor_pb2.FileDescriptorProto) -> None:
        field_of(f, "KillRequest", "signal").type = FieldProto.TYPE_INT32

    def relabel(f: descriptor_pb2.FileDescriptorProto) -> None:
        field_of(f, "CreateTaskRequest", "rootfs").label = FieldProto.LABEL_OPTIONAL

    def rename(f: descriptor_pb2.FileDescriptorProto) -> None:
        field_of(f, "StateRequest", "exec_id").name = "execid"

    def retarget(f: descriptor_pb2.FileDescriptorProto) -> None:
        field_of(f, "CreateTaskRequest", "rootfs").type_name = ".containerd.types.NotMount"

    def drop_field(f: descriptor_pb2.FileDescriptorProto) -> None:
        fields = message(f, "ConnectResponse").field
        del fields[len(fields) - 1]

    def add_field(f: descriptor_pb2.FileDescriptorProto) -> None:
        message(f, "WaitRequest").field.add(
            name="extra", number=9, type=FieldProto.TYPE_BOOL, label=FieldProto.LABEL_OPTIONAL
        )

    def drop_message(f: descriptor_pb2.FileDescriptorProto) -> None:
        messages = f.message_type
        del messages[[m.name for m in messages].index("ResumeRequest")]

    def reroute(f: descriptor_pb2.FileDescriptorProto) -> None:
        method = next(m for m in f.service[0].method if m.name == "Wait")
        method.output_type = ".google.protobuf.Empty"

    def resyntax(f: descriptor_pb2.FileDescriptorProto) -> None:
        f.syntax = "proto2"

    yield "renumbered field", renumber, "KillRequest.signal"
    yield "retyped field", retype, "TYPE_INT32"
    yield "relabelled field", relabel, "CreateTaskRequest.rootfs"
    yield "renamed field", rename, "StateRequest.exec_id"
    yield "other message type", retarget, "NotMount"
    yield "dropped field", drop_field, "ConnectResponse.version"
    yield "added field", add_field, "WaitRequest.extra"
    yield "dropped message", drop_message, "ResumeRequest"
    yield "changed rpc", reroute, "Task.Wait"
    yield "changed syntax", resyntax, "syntax"


@pytest.mark.parametrize(
    ("mutation", "mutate", "reported"), list(_mutations()), ids=[m[0] for m in _mutations()]
)
def test_comparison_reports_a_mutated_descriptor(
    mutation: str,
    mutate: Callable[[descriptor_pb2.FileDescriptorProto], None],
    reported: str,
    upstream_files: dict[str, UpstreamFile],
) -> None:
    mutated = our_file(shim_pb2)
    mutate(mutated)
    problems = compare_mirror(SHIM_V2_1_7, upstream_files[SHIM_V2_1_7.id], ours=mutated)
    assert any(reported in problem for problem in problems), (mutation, problems)


def test_comparison_reports_a_changed_enum_value_and_criu_package_mapping(
    upstream_files: dict[str, UpstreamFile],
) -> None:
    mirror = next(m for m in MIRRORS if m.module is criu_rpc_pb2)
    mutated = our_file(criu_rpc_pb2)
    req_type = next(e for e in mutated.enum_type if e.name == "criu_req_type")
    next(v for v in req_type.value if v.name == "RESTORE").number = 20
    opts = next(m for m in mutated.message_type if m.name == "criu_opts")
    next(f for f in opts.field if f.name == "ps").type_name = ".criu.criu_notify"
    problems = compare_mirror(mirror, upstream_files[mirror.id], ours=mutated)
    assert "enum criu.criu_req_type.RESTORE: number 20 != 2" in problems
    assert any("criu.criu_opts.ps" in p and "criu_page_server_info" in p for p in problems)


# --------------------------------------------------------------------------------------
# (c) encoding and decoding
# --------------------------------------------------------------------------------------


def pack_bare(message: Message) -> any_pb2.Any:
    """Pack as containerd does: type_url is the bare full name, with no host prefix."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def unpack_bare(packed: any_pb2.Any, message: Message) -> bool:
    """Decode packed into message if its bare type_url names message's type.

    protobuf's own Any.Is/Unpack insist on a "/" in the type_url and so refuse
    containerd's bare names.
    """
    if packed.type_url.rsplit("/", 1)[-1] != message.DESCRIPTOR.full_name:
        return False
    message.ParseFromString(packed.value)
    return True


def test_bare_type_url_any_round_trip() -> None:
    options = runc_options_pb2.Options(binary_name="runc", root="/run/kyb", io_uid=1000)
    request = shim_pb2.CreateTaskRequest(
        id="c1",
        bundle="/run/bundle",
        rootfs=[mount_pb2.Mount(type="overlay", source="overlay", options=["lowerdir=/a"])],
        options=pack_bare(options),
    )
    decoded = shim_pb2.CreateTaskRequest.FromString(request.SerializeToString())

    assert decoded.options.type_url == "containerd.runc.v1.Options"
    assert not unpack_bare(decoded.options, runctypes_pb2.CreateOptions())
    unpacked = runc_options_pb2.Options()
    assert unpack_bare(decoded.options, unpacked)
    assert unpacked == options
    assert list(decoded.rootfs[0].options) == ["lowerdir=/a"]


def test_event_envelope_round_trip() -> None:
    exited_at = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    exit_event = events_pb2.TaskExit(
        container_id="c1", id="c1", pid=4242, exit_status=137, exited_at=exited_at
    )
    forward = events_ttrpc_pb2.ForwardRequest(
        envelope=events_ttrpc_pb2.Envelope(
            timestamp=exited_at,
            namespace="default",
            topic="/tasks/exit",
            event=pack_bare(exit_event),
        )
    )
    decoded = events_ttrpc_pb2.ForwardRequest.FromString(forward.SerializeToString())
    assert decoded.envelope.event.type_url == "containerd.events.TaskExit"
    unpacked = events_pb2.TaskExit()
    assert unpack_bare(decoded.envelope.event, unpacked)
    assert unpacked == exit_event


def test_ttrpc_envelope_bytes_are_the_documented_encoding() -> None:
    request = ttrpc_pb2.Request(
        service="containerd.task.v2.Task",
        method="Wait",
        payload=b"\x0a\x02c1",
        timeout_nano=1,
        metadata=[ttrpc_pb2.KeyValue(key="k", value="v")],
    )
    expected = (
        b"\x0a\x17containerd.task.v2.Task"  # field 1, length-delimited
        b"\x12\x04Wait"  # field 2
        b"\x1a\x04\x0a\x02c1"  # field 3, bytes
        b"\x20\x01"  # field 4, varint
        b"\x2a\x06\x0a\x01k\x12\x01v"  # field 5, embedded KeyValue
    )
    assert request.SerializeToString(deterministic=True) == expected
    response = ttrpc_pb2.Response(status=status_pb2.Status(code=5, message="not found"))
    assert response.SerializeToString() == b"\x0a\x0d\x08\x05\x12\x09not found"


# Messages in protobuf text format, encoded by protoc from upstream's own .proto files.
def _mirror(module: ModuleType, source: Upstream) -> Mirror:
    return next(m for m in MIRRORS if m.module is module and m.source is source)


UPSTREAM_ENCODED = tuple(
    (mirror, message_type, text)
    for source in (CONTAINERD_1_7, CONTAINERD_2)
    for mirror, message_type, text in (
        (
            _mirror(shim_pb2, source),
            shim_pb2.StateResponse,
            (
                'id: "c1" bundle: "/b" pid: 7 status: PAUSED terminal: true exit_status: 3 '
                'exited_at { seconds: 12 nanos: 34 } exec_id: "e1"'
            ),
        ),
        (
            _mirror(shim_v3_pb2, source),
            shim_v3_pb2.UpdateTaskRequest,
            (
                'id: "c1" resources { type_url: "types.containerd.io/opencontainers/runtime-spec/1/'
                'LinuxResources" value: "{}" } annotations { key: "a" value: "b" }'
            ),
        ),
        (
            _mirror(runctypes_pb2, source),
            runctypes_pb2.CheckpointOptions,
            (
                'exit: true open_tcp: true empty_namespaces: "network" work_path: "/w" '
                'image_path: "/i"'
            ),
        ),
        (
            _mirror(runc_options_pb2, source),
            runc_options_pb2.Options,
            'binary_name: "runc" root: "/r" systemd_cgroup: true criu_image_path: "/i"',
        ),
        (
            _mirror(cgroups_v1_metrics_pb2, source),
            cgroups_v1_metrics_pb2.Metrics,
            (
                "pids { current: 3 limit: 10 } cpu { usage { total: 9 per_cpu: [1, 2, 6] } } "
                "memory { usage { usage: 4096 limit: 8192 } total_rss: 77 }"
            ),
        ),
    )
) + (
    (
        _mirror(criu_rpc_pb2, COMMON),
        criu_rpc_pb2.criu_req,
        (
            'type: DUMP opts { images_dir_fd: 5 leave_running: true freeze_cgroup: "/f" '
            'ext_mnt { key: "/etc/hosts" val: "/etc/hosts" } manage_cgroups_mode: SOFT } '
            "notify_success: true"
        ),
    ),
)


@pytest.mark.parametrize(
    ("mirror", "message_type", "text"),
    UPSTREAM_ENCODED,
    ids=[f"{m[0].source.name}:{m[1].DESCRIPTOR.name}" for m in UPSTREAM_ENCODED],
)
def test_upstream_encoding_decodes_and_ours_decodes_upstream(
    mirror: Mirror, message_type: type[Message], text: str
) -> None:
    assert not _missing_upstream_files(), _missing_upstream_files()
    # Upstream's CRIU file has no package; ours puts it in criu.
    upstream_name = message_type.DESCRIPTOR.full_name.removeprefix("criu.")
    encoded = _protoc(mirror.source, f"--encode={upstream_name}", mirror.upstream,
                      stdin=text.encode())
    expected = message_type()
    text_format.Parse(text, expected)
    decoded = message_type.FromString(encoded)
    assert decoded == expected
    assert len(unknown_fields.UnknownFieldSet(decoded)) == 0

    # And the other way: what we encode, upstream's schema reads back field for field.
    upstream_text = _protoc(
        mirror.source, f"--decode={upstream_name}", mirror.upstream,
        stdin=expected.SerializeToString(),
    ).decode()
    round_tripped = message_type()
    text_format.Parse(upstream_text, round_tripped)
    assert round_tripped == expected


def test_stats_pack_with_the_type_url_containerd_expects() -> None:
    v1 = cgroups_v1_metrics_pb2.Metrics(pids=cgroups_v1_metrics_pb2.PidsStat(current=1))
    v2 = cgroups_v2_metrics_pb2.Metrics(
        memory_events=cgroups_v2_metrics_pb2.MemoryEvents(oom_kill=2)
    )
    assert pack_bare(v1).type_url == "io.containerd.cgroups.v1.Metrics"
    response = shim_pb2.StatsResponse(stats=pack_bare(v2))
    decoded = shim_pb2.StatsResponse.FromString(response.SerializeToString())
    assert decoded.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    unpacked = cgroups_v2_metrics_pb2.Metrics()
    assert unpack_bare(decoded.stats, unpacked) and unpacked.memory_events.oom_kill == 2


def test_runtime_options_and_checkpoint_options_decode_by_type_url() -> None:
    checkpoint = runc_options_pb2.CheckpointOptions(file_locks=True, image_path="/img")
    legacy = runctypes_pb2.CheckpointOptions(file_locks=True, image_path="/img")
    # The two CheckpointOptions number image_path differently; the type_url tells them apart.
    assert checkpoint.SerializeToString() != legacy.SerializeToString()
    cri = runtimeoptions_pb2.Options(type_url="containerd.runc.v1.Options", config_body=b"x = 1")
    decoded = runtimeoptions_pb2.Options.FromString(cri.SerializeToString())
    assert decoded.config_body == b"x = 1"
    # Upstream declares the body as bytes: what is not UTF-8 must still decode.
    assert runtimeoptions_pb2.Options.FromString(b"\x1a\x02\xff\xfe").config_body == b"\xff\xfe"


def test_criu_required_fields_are_enforced() -> None:
    with pytest.raises(EncodeError):
        criu_rpc_pb2.criu_req().SerializeToString()
    with pytest.raises(EncodeError):
        criu_rpc_pb2.criu_req(
            type=criu_rpc_pb2.DUMP,
            opts=criu_rpc_pb2.criu_opts(inherit_fd=[criu_rpc_pb2.inherit_fd(key="fd[1]")]),
        ).SerializeToString()
    opts = criu_rpc_pb2.criu_opts()
    assert opts.images_dir_fd == -1 and opts.log_level == 2 and opts.cpu_cap == 0xFFFFFFFF
    assert opts.network_lock == criu_rpc_pb2.IPTABLES
    assert opts.pre_dump_mode == criu_rpc_pb2.SPLICE


@pytest.fixture
def criu_swrk() -> Iterator[socket.socket]:
    """A `criu swrk` service on one end of a SOCK_SEQPACKET pair."""
    criu = shutil.which("criu")
    assert criu is not None, "criu is not installed"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    process = subprocess.Popen(
        [criu, "swrk", str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    theirs.close()
    ours.settimeout(30)
    try:
        yield ours
    finally:
        ours.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_criu_answers_a_version_request(criu_swrk: socket.socket) -> None:
    reported = subprocess.run(
        ["criu", "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    match = re.search(r"Version: (\d+)\.(\d+)(?:\.(\d+))?", reported)
    assert match, reported

    criu_swrk.send(criu_rpc_pb2.criu_req(type=criu_rpc_pb2.VERSION).SerializeToString())
    response = criu_rpc_pb2.criu_resp.FromString(criu_swrk.recv(1 << 20))

    assert response.type == criu_rpc_pb2.VERSION and response.success
    assert response.version.major_number == int(match.group(1))
    assert response.version.minor_number == int(match.group(2))
    assert response.version.sublevel == int(match.group(3) or 0)


def test_criu_answers_a_feature_check(criu_swrk: socket.socket) -> None:
    request = criu_rpc_pb2.criu_req(
        type=criu_rpc_pb2.FEATURE_CHECK,
        features=criu_rpc_pb2.criu_features(mem_track=True, lazy_pages=True),
    )
    criu_swrk.send(request.SerializeToString())
    response = criu_rpc_pb2.criu_resp.FromString(criu_swrk.recv(1 << 20))
    assert response.type == criu_rpc_pb2.FEATURE_CHECK and response.success
    # CRIU answers yes or no for each feature it was asked about.
    assert response.features.HasField("mem_track") and response.features.HasField("lazy_pages")


def test_process_info_carries_process_details() -> None:
    info = task_types_pb2.ProcessInfo(
        pid=12, info=pack_bare(runc_options_pb2.ProcessDetails(exec_id="e1"))
    )
    response = shim_pb2.PidsResponse(processes=[info])
    decoded = shim_pb2.PidsResponse.FromString(response.SerializeToString())
    details = runc_options_pb2.ProcessDetails()
    assert unpack_bare(decoded.processes[0].info, details) and details.exec_id == "e1"
    assert task_types_pb2.Status.Name(task_types_pb2.PAUSING) == "PAUSING"
