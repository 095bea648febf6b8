"""Agent configuration: a TOML file, then command-line flags on top.

Example (every key optional):

    socket = "/run/kybernate/agent.sock"
    node_name = "gpu-node-1"    # this node's key in the bucket's name index; default: host name
    state_dir = "/var/lib/kybernate/agent"
    local_tier = "/var/lib/kybernate/checkpoints"

    [cuda]
    backend = "auto"            # auto, driver, tool, fake
    fake_dir = ""               # fake backend only
    lock_timeout_ms = 10000

    [checkpoint]
    open_tcp = false            # default when a request leaves it unset
    leave_running = true        # default when a request leaves `exit` unset
    rootfs_diff = true          # default when a request leaves it unset: save the writable
                                # layer of an overlay root (processes with open files in it
                                # restore only with it)
    memory_budget_bytes = 0     # host memory that dumps may hold at once; 0: total RAM
    min_free_bytes = 1073741824 # refuse a checkpoint leaving less free disk

    [s3]
    endpoint_url = "http://127.0.0.1:9000"
    bucket = "checkpoints"
    prefix = "node-a/"
    region = "us-east-1"
    access_key_id = ""          # empty: boto3's usual chain (env, profile, role)
    secret_access_key = ""
    max_attempts = 5            # promoter: tries per checkpoint, with backoff, before the sweep
    backoff_base_s = 0.5
    backoff_max_s = 30.0
    promote_interval_s = 60.0
    retry_mode = "standard"     # botocore's retries of each request: standard or adaptive
    request_max_attempts = 4    # botocore: attempts per request, the first included
    part_size_bytes = 67108864  # multipart part size (5 MiB to 5 GiB)
    max_concurrency = 4         # parallel part transfers; memory stays bounded by it

    [restore]
    # Host directories an `io.kybernate.restore-from` annotation may name (none by
    # default: restore registry checkpoints by name instead).
    allowed_roots = ["/srv/kybernate/golden"]
    # Checkpoints other namespaces may restore (besides `kybernate checkpoint share`):
    # by id or namespace/name; namespace "*" is every namespace.
    shares = [{ checkpoint = "team-a/golden-llm", namespace = "k8s.io", pod_namespace = "team-b" }]
    # Restore with CRIU's lazy pages (the task runs before its memory is in) unless a
    # container's `io.kybernate.restore.lazy` says otherwise.
    lazy_pages = false

    [retention]                 # what `kybernate checkpoint gc` and the background job remove
    keep_per_container = 0      # keep the newest N committed checkpoints of each container; 0: all
    max_age_s = 0               # remove checkpoints older than this; 0: never
    local_max_bytes = 0         # evict the oldest local copies above this; 0: no budget
    remote_max_bytes = 0        # remove the oldest remote copies above this; 0: no budget
    interval_s = 3600.0         # how often the policy runs in the background; 0: on demand only
    restore_hold_s = 900.0      # a restore keeps its checkpoint in use until it completes, or this long

    [oci]                       # checkpoint images in OCI registries
    registries = ["registry.example.com", "127.0.0.1:5000"]  # hosts that imports and
                                # `io.kybernate.restore-from=oci:` may pull from; none by default
    plain_http = ["127.0.0.1:5000"]  # of those, the ones spoken to over plain HTTP

    [metrics]
    port = 0                    # 0: no metrics endpoint
    address = "127.0.0.1"
    occupancy_interval_s = 15.0 # how often tier occupancy is recounted

    [log]
    format = "text"             # text or json (one JSON object a line)
    level = "info"

    [debug]                     # fault injection, for tests only
    hold_after_phase = { dumped = 30.0 }
    hold_during_commit = 0.0    # seconds, after the files are hashed and synced
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kybernate.agent import naming
from kybernate.agent.access import ConfiguredShare, Share
from kybernate.agent.retention import RetentionPolicy
from kybernate.errors import InvalidArgument

CUDA_BACKENDS = ("auto", "driver", "tool", "fake")
RETRY_MODES = ("standard", "adaptive")
#: S3's limits on a multipart upload's parts (the last one may be smaller).
PART_SIZE_MIN = 5 << 20
PART_SIZE_MAX = 5 << 30
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
PHASE_NAMES = ("accepted", "admitted", "gpu_locked", "gpu_checkpointed", "frozen", "dumped", "resumed", "committed")


@dataclasses.dataclass(frozen=True)
class S3Config:
    bucket: str
    endpoint_url: str | None = None
    prefix: str = ""
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    promote_interval_s: float = 60.0
    retry_mode: str = "standard"
    request_max_attempts: int = 4
    part_size_bytes: int = 64 << 20
    max_concurrency: int = 4

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def default_node_name() -> str:
    return socket.gethostname().lower()


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    socket: Path = Path("/run/kybernate/agent.sock")
    node_name: str = dataclasses.field(default_factory=default_node_name)
    state_dir: Path = Path("/var/lib/kybernate/agent")
    local_tier: Path = Path("/var/lib/kybernate/checkpoints")
    cuda_backend: str = "auto"
    cuda_fake_dir: Path | None = None
    gpu_lock_timeout_ms: int = 10_000
    default_open_tcp: bool = False
    default_leave_running: bool = True
    default_rootfs_diff: bool = True
    memory_budget_bytes: int = 0
    min_free_bytes: int = 1 << 30
    s3: S3Config | None = None
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"
    occupancy_interval_s: float = 15.0
    retention: RetentionPolicy = dataclasses.field(default_factory=RetentionPolicy)
    restore_hold_s: float = 900.0
    oci_registries: tuple[str, ...] = ()
    oci_plain_http: tuple[str, ...] = ()
    log_format: str = "text"
    log_level: str = "info"
    restore_allowed_roots: tuple[Path, ...] = ()
    restore_shares: tuple[ConfiguredShare, ...] = ()
    # Restores use CRIU's lazy pages unless the container says otherwise.
    restore_lazy_pages: bool = False
    debug_hold_after_phase: Mapping[str, float] = dataclasses.field(default_factory=dict)
    debug_hold_during_commit_s: float = 0.0

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.db"

    @property
    def work_root(self) -> Path:
        """CRIU work directories (dump.log), one per checkpoint in flight."""
        return self.state_dir / "work"

    @property
    def failed_root(self) -> Path:
        """Logs of failed checkpoints, kept for the operator."""
        return self.state_dir / "failed-checkpoints"


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"config: [{name}] must be a table")
    return value


def _typed(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table.get(key)
    if value is None:
        return None
    # bool is an int in Python; refuse `true` where a number is meant.
    wrong_bool = isinstance(value, bool) and kind is not bool
    if wrong_bool or not isinstance(value, kind):
        raise InvalidArgument(f"config: {where}{key} = {value!r} has the wrong type")
    return value


_KNOWN = {
    "": {"socket", "node_name", "state_dir", "local_tier", "cuda", "checkpoint", "s3", "restore", "metrics", "debug",
         "retention", "oci", "log"},
    "cuda": {"backend", "fake_dir", "lock_timeout_ms"},
    "checkpoint": {"open_tcp", "leave_running", "rootfs_diff", "memory_budget_bytes", "min_free_bytes"},
    "s3": {"endpoint_url", "bucket", "prefix", "region", "access_key_id", "secret_access_key",
           "max_attempts", "backoff_base_s", "backoff_max_s", "promote_interval_s", "retry_mode",
           "request_max_attempts", "part_size_bytes", "max_concurrency"},
    "restore": {"allowed_roots", "shares", "lazy_pages"},
    "metrics": {"port", "address", "occupancy_interval_s"},
    "retention": {"keep_per_container", "max_age_s", "local_max_bytes", "remote_max_bytes", "interval_s",
                  "restore_hold_s"},
    "oci": {"registries", "plain_http"},
    "log": {"format", "level"},
    "debug": {"hold_after_phase", "hold_during_commit"},
}


def _refuse_unknown(data: Mapping[str, Any]) -> None:
    for key in data:
        if key not in _KNOWN[""]:
            raise InvalidArgument(f"config: unknown key {key!r}")
    for section, keys in _KNOWN.items():
        if section and isinstance(data.get(section), Mapping):
            for key in data[section]:
                if key not in keys:
                    raise InvalidArgument(f"config: unknown key [{section}] {key!r}")


def _list(table: Mapping[str, Any], key: str) -> list[Any]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise InvalidArgument(f"config: {key} must be a list")
    return value


def _configured_share(entry: Any) -> ConfiguredShare:
    if not isinstance(entry, Mapping) or set(entry) - {"checkpoint", "namespace", "pod_namespace"}:
        raise InvalidArgument("config: each [restore] shares entry is { checkpoint, namespace, pod_namespace }")
    checkpoint = entry.get("checkpoint")
    if not isinstance(checkpoint, str) or not (naming.is_checkpoint_id(checkpoint) or "/" in checkpoint):
        raise InvalidArgument(f"config: [restore] shares: checkpoint {checkpoint!r} must be an id or"
                              " namespace/name")
    if not naming.is_checkpoint_id(checkpoint):
        owner, _, name = checkpoint.partition("/")
        naming.containerd_namespace(owner)
        naming.checkpoint_name(name)
    namespace, pod_namespace = entry.get("namespace"), entry.get("pod_namespace", "")
    if not isinstance(namespace, str) or not isinstance(pod_namespace, str):
        raise InvalidArgument("config: [restore] shares: namespace and pod_namespace are strings")
    return ConfiguredShare(checkpoint, Share(namespace, pod_namespace))


def config_from_mapping(data: Mapping[str, Any]) -> AgentConfig:
    """Build and validate a config from parsed TOML."""
    _refuse_unknown(data)
    fields: dict[str, Any] = {}
    for key in ("socket", "state_dir", "local_tier"):
        if (value := _typed(data, key, str, "")) is not None:
            fields[key] = Path(value)
    if (node := _typed(data, "node_name", str, "")) is not None:
        fields["node_name"] = node

    cuda = _section(data, "cuda")
    if (backend := _typed(cuda, "backend", str, "[cuda] ")) is not None:
        fields["cuda_backend"] = backend
    if fake_dir := _typed(cuda, "fake_dir", str, "[cuda] "):
        fields["cuda_fake_dir"] = Path(fake_dir)
    if (timeout := _typed(cuda, "lock_timeout_ms", int, "[cuda] ")) is not None:
        fields["gpu_lock_timeout_ms"] = timeout

    ckpt = _section(data, "checkpoint")
    if (open_tcp := _typed(ckpt, "open_tcp", bool, "[checkpoint] ")) is not None:
        fields["default_open_tcp"] = open_tcp
    if (leave := _typed(ckpt, "leave_running", bool, "[checkpoint] ")) is not None:
        fields["default_leave_running"] = leave
    if (rootfs_diff := _typed(ckpt, "rootfs_diff", bool, "[checkpoint] ")) is not None:
        fields["default_rootfs_diff"] = rootfs_diff
    for key in ("memory_budget_bytes", "min_free_bytes"):
        if (value := _typed(ckpt, key, int, "[checkpoint] ")) is not None:
            fields[key] = value

    s3 = _section(data, "s3")
    if s3:
        bucket = _typed(s3, "bucket", str, "[s3] ")
        if not bucket:
            raise InvalidArgument("config: [s3] needs a bucket")
        s3_fields: dict[str, Any] = {"bucket": bucket}
        for key in ("endpoint_url", "prefix", "region", "access_key_id", "secret_access_key", "retry_mode"):
            if (value := _typed(s3, key, str, "[s3] ")) is not None:
                s3_fields[key] = value if key in ("prefix", "retry_mode") else (value or None)
        for key in ("max_attempts", "request_max_attempts", "part_size_bytes", "max_concurrency"):
            if (value := _typed(s3, key, int, "[s3] ")) is not None:
                s3_fields[key] = value
        for key in ("backoff_base_s", "backoff_max_s", "promote_interval_s"):
            if (value := _typed(s3, key, (int, float), "[s3] ")) is not None:
                s3_fields[key] = float(value)
        fields["s3"] = S3Config(**s3_fields)

    restore = _section(data, "restore")
    roots = restore.get("allowed_roots", [])
    if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
        raise InvalidArgument("config: [restore] allowed_roots must be a list of absolute paths")
    fields["restore_allowed_roots"] = tuple(Path(r) for r in roots)
    fields["restore_shares"] = tuple(_configured_share(entry) for entry in _list(restore, "shares"))
    if (lazy := _typed(restore, "lazy_pages", bool, "[restore] ")) is not None:
        fields["restore_lazy_pages"] = lazy

    metrics = _section(data, "metrics")
    if (port := _typed(metrics, "port", int, "[metrics] ")) is not None:
        fields["metrics_port"] = port
    if (address := _typed(metrics, "address", str, "[metrics] ")) is not None:
        fields["metrics_address"] = address
    if (interval := _typed(metrics, "occupancy_interval_s", (int, float), "[metrics] ")) is not None:
        fields["occupancy_interval_s"] = float(interval)

    retention = _section(data, "retention")
    policy: dict[str, Any] = {}
    for key in ("keep_per_container", "local_max_bytes", "remote_max_bytes"):
        if (value := _typed(retention, key, int, "[retention] ")) is not None:
            policy[key] = value
    for key in ("max_age_s", "interval_s"):
        if (value := _typed(retention, key, (int, float), "[retention] ")) is not None:
            policy[key] = float(value)
    fields["retention"] = RetentionPolicy(**policy)
    if (hold := _typed(retention, "restore_hold_s", (int, float), "[retention] ")) is not None:
        fields["restore_hold_s"] = float(hold)

    oci = _section(data, "oci")
    for key, field in (("registries", "oci_registries"), ("plain_http", "oci_plain_http")):
        hosts = _list(oci, key)
        if not all(isinstance(h, str) and h for h in hosts):
            raise InvalidArgument(f"config: [oci] {key} must be a list of registry hosts (host[:port])")
        fields[field] = tuple(hosts)

    logs = _section(data, "log")
    for key in ("format", "level"):
        if (value := _typed(logs, key, str, "[log] ")) is not None:
            fields[f"log_{key}"] = value

    debug = _section(data, "debug")
    holds = debug.get("hold_after_phase", {})
    if not isinstance(holds, Mapping):
        raise InvalidArgument("config: [debug] hold_after_phase must be a table of phase = seconds")
    fields["debug_hold_after_phase"] = {str(k).lower(): float(v) for k, v in holds.items()}
    if (hold := _typed(debug, "hold_during_commit", (int, float), "[debug] ")) is not None:
        fields["debug_hold_during_commit_s"] = float(hold)

    return validate(AgentConfig(**fields))


def validate(config: AgentConfig) -> AgentConfig:
    if config.cuda_backend not in CUDA_BACKENDS:
        raise InvalidArgument(f"config: cuda backend {config.cuda_backend!r} is not one of {', '.join(CUDA_BACKENDS)}")
    if config.cuda_backend == "fake" and config.cuda_fake_dir is None:
        raise InvalidArgument("config: the fake cuda backend needs fake_dir")
    if config.gpu_lock_timeout_ms <= 0:
        raise InvalidArgument("config: lock_timeout_ms must be positive")
    if config.memory_budget_bytes < 0 or config.min_free_bytes < 0:
        raise InvalidArgument("config: byte limits cannot be negative")
    if not 0 <= config.metrics_port < 65536:
        raise InvalidArgument(f"config: metrics port {config.metrics_port} is out of range")
    if config.occupancy_interval_s <= 0:
        raise InvalidArgument("config: [metrics] occupancy_interval_s must be positive")
    policy = config.retention
    if min(policy.keep_per_container, policy.local_max_bytes, policy.remote_max_bytes) < 0 \
            or min(policy.max_age_s, policy.interval_s) < 0 or config.restore_hold_s <= 0:
        raise InvalidArgument("config: [retention] values cannot be negative (restore_hold_s must be positive)")
    if config.log_format not in LOG_FORMATS:
        raise InvalidArgument(f"config: [log] format {config.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    if config.log_level not in LOG_LEVELS:
        raise InvalidArgument(f"config: [log] level {config.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    for host in (*config.oci_registries, *config.oci_plain_http):
        naming.registry_host(host)
    for phase, seconds in config.debug_hold_after_phase.items():
        if phase not in PHASE_NAMES:
            raise InvalidArgument(f"config: hold_after_phase names unknown phase {phase!r}")
        if seconds < 0:
            raise InvalidArgument(f"config: hold_after_phase {phase} is negative")
    try:
        naming.node_name(config.node_name)
    except InvalidArgument as exc:
        raise InvalidArgument(f"config: {exc} (set node_name)") from None
    if config.s3 is not None:
        _validate_s3(config.s3)
    for path in (config.socket, config.state_dir, config.local_tier, *config.restore_allowed_roots):
        if not path.is_absolute():
            raise InvalidArgument(f"config: {path} must be an absolute path")
    return config


def _validate_s3(s3: S3Config) -> None:
    if s3.max_attempts < 1 or s3.request_max_attempts < 1:
        raise InvalidArgument("config: [s3] max_attempts and request_max_attempts must be at least 1")
    if s3.retry_mode not in RETRY_MODES:
        raise InvalidArgument(f"config: [s3] retry_mode {s3.retry_mode!r} is not one of {', '.join(RETRY_MODES)}")
    if not PART_SIZE_MIN <= s3.part_size_bytes <= PART_SIZE_MAX:
        raise InvalidArgument(f"config: [s3] part_size_bytes {s3.part_size_bytes} is outside S3's"
                              f" {PART_SIZE_MIN} to {PART_SIZE_MAX}")
    if not 1 <= s3.max_concurrency <= 64:
        raise InvalidArgument(f"config: [s3] max_concurrency {s3.max_concurrency} is not between 1 and 64")


def load_file(path: Path) -> AgentConfig:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise InvalidArgument(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {path}: {exc}") from None
    return config_from_mapping(data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument("--socket", type=Path, help="gRPC unix socket path")
    parser.add_argument("--node-name", help="this node's key in the bucket's name index")
    parser.add_argument("--state-dir", type=Path, help="registry and work directories")
    parser.add_argument("--local-tier", type=Path, help="directory of committed checkpoints")
    parser.add_argument("--cuda-backend", choices=CUDA_BACKENDS)
    parser.add_argument("--cuda-fake-dir", type=Path)
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--log-format", choices=LOG_FORMATS, help="text, or one JSON object a line")


def config_from_args(argv: Sequence[str]) -> AgentConfig:
    """Parse `kybernate agent` flags: the file first, flags override it."""
    parser = argparse.ArgumentParser(prog="kybernate agent", description="Kybernate node agent")
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    config = load_file(args.config) if args.config else AgentConfig()
    overrides: dict[str, Any] = {}
    for flag, field in (("socket", "socket"), ("node_name", "node_name"), ("state_dir", "state_dir"), ("local_tier", "local_tier"),
                        ("cuda_backend", "cuda_backend"), ("cuda_fake_dir", "cuda_fake_dir"),
                        ("metrics_port", "metrics_port"), ("log_format", "log_format")):
        if (value := getattr(args, flag)) is not None:
            overrides[field] = value
    return validate(dataclasses.replace(config, **overrides))
