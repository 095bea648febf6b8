from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    ACCEPTED: _ClassVar[Phase]
    GPU_LOCKED: _ClassVar[Phase]
    GPU_CHECKPOINTED: _ClassVar[Phase]
    FROZEN: _ClassVar[Phase]
    DUMPED: _ClassVar[Phase]
    RESUMED: _ClassVar[Phase]
    COMMITTED: _ClassVar[Phase]
    FAILED: _ClassVar[Phase]
    ADMITTED: _ClassVar[Phase]
    EXPORTED: _ClassVar[Phase]

class ContainerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTAINER_STATE_UNSPECIFIED: _ClassVar[ContainerState]
    UNTOUCHED: _ClassVar[ContainerState]
    RESTORED: _ClassVar[ContainerState]
    MUST_KILL: _ClassVar[ContainerState]
    EXITED: _ClassVar[ContainerState]
PHASE_UNSPECIFIED: Phase
ACCEPTED: Phase
GPU_LOCKED: Phase
GPU_CHECKPOINTED: Phase
FROZEN: Phase
DUMPED: Phase
RESUMED: Phase
COMMITTED: Phase
FAILED: Phase
ADMITTED: Phase
EXPORTED: Phase
CONTAINER_STATE_UNSPECIFIED: ContainerState
UNTOUCHED: ContainerState
RESTORED: ContainerState
MUST_KILL: ContainerState
EXITED: ContainerState

class CheckpointOptions(_message.Message):
    __slots__ = ("exit", "open_tcp", "external_unix_sockets", "terminal", "file_locks", "rootfs_diff", "gpu_lock_timeout_ms", "deadline_ms")
    EXIT_FIELD_NUMBER: _ClassVar[int]
    OPEN_TCP_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_UNIX_SOCKETS_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    FILE_LOCKS_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_DIFF_FIELD_NUMBER: _ClassVar[int]
    GPU_LOCK_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    exit: bool
    open_tcp: bool
    external_unix_sockets: bool
    terminal: bool
    file_locks: bool
    rootfs_diff: bool
    gpu_lock_timeout_ms: int
    deadline_ms: int
    def __init__(self, exit: _Optional[bool] = ..., open_tcp: _Optional[bool] = ..., external_unix_sockets: _Optional[bool] = ..., terminal: _Optional[bool] = ..., file_locks: _Optional[bool] = ..., rootfs_diff: _Optional[bool] = ..., gpu_lock_timeout_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("container_id", "namespace", "bundle", "runc_root", "init_pid", "destination", "name", "options", "image_ref", "labels", "pod_namespace", "work_path", "return_after_export")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    RUNC_ROOT_FIELD_NUMBER: _ClassVar[int]
    INIT_PID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REF_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WORK_PATH_FIELD_NUMBER: _ClassVar[int]
    RETURN_AFTER_EXPORT_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    namespace: str
    bundle: str
    runc_root: str
    init_pid: int
    destination: str
    name: str
    options: CheckpointOptions
    image_ref: str
    labels: _containers.ScalarMap[str, str]
    pod_namespace: str
    work_path: str
    return_after_export: bool
    def __init__(self, container_id: _Optional[str] = ..., namespace: _Optional[str] = ..., bundle: _Optional[str] = ..., runc_root: _Optional[str] = ..., init_pid: _Optional[int] = ..., destination: _Optional[str] = ..., name: _Optional[str] = ..., options: _Optional[_Union[CheckpointOptions, _Mapping]] = ..., image_ref: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., pod_namespace: _Optional[str] = ..., work_path: _Optional[str] = ..., return_after_export: _Optional[bool] = ...) -> None: ...

class CheckpointProgress(_message.Message):
    __slots__ = ("phase", "checkpoint_id", "local_path", "elapsed_ms", "error_code", "error_message", "container_state", "cuda_pids")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PATH_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_STATE_FIELD_NUMBER: _ClassVar[int]
    CUDA_PIDS_FIELD_NUMBER: _ClassVar[int]
    phase: Phase
    checkpoint_id: str
    local_path: str
    elapsed_ms: int
    error_code: int
    error_message: str
    container_state: ContainerState
    cuda_pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, phase: _Optional[_Union[Phase, str]] = ..., checkpoint_id: _Optional[str] = ..., local_path: _Optional[str] = ..., elapsed_ms: _Optional[int] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., container_state: _Optional[_Union[ContainerState, str]] = ..., cuda_pids: _Optional[_Iterable[int]] = ...) -> None: ...

class PrepareRestoreRequest(_message.Message):
    __slots__ = ("directory", "checkpoint", "host_directory", "namespace", "pod_namespace", "container_id", "defer_pages", "lazy_pages")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    HOST_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    DEFER_PAGES_FIELD_NUMBER: _ClassVar[int]
    LAZY_PAGES_FIELD_NUMBER: _ClassVar[int]
    directory: str
    checkpoint: str
    host_directory: str
    namespace: str
    pod_namespace: str
    container_id: str
    defer_pages: bool
    lazy_pages: bool
    def __init__(self, directory: _Optional[str] = ..., checkpoint: _Optional[str] = ..., host_directory: _Optional[str] = ..., namespace: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., container_id: _Optional[str] = ..., defer_pages: _Optional[bool] = ..., lazy_pages: _Optional[bool] = ...) -> None: ...

class PrepareRestoreResponse(_message.Message):
    __slots__ = ("image_dir", "metadata_json", "gpu_map", "checkpoint_id", "verification_id", "deferred_files", "lazy_pages")
    class GpuMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_DIR_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    GPU_MAP_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_FILES_FIELD_NUMBER: _ClassVar[int]
    LAZY_PAGES_FIELD_NUMBER: _ClassVar[int]
    image_dir: str
    metadata_json: str
    gpu_map: _containers.ScalarMap[str, str]
    checkpoint_id: str
    verification_id: str
    deferred_files: _containers.RepeatedScalarFieldContainer[str]
    lazy_pages: bool
    def __init__(self, image_dir: _Optional[str] = ..., metadata_json: _Optional[str] = ..., gpu_map: _Optional[_Mapping[str, str]] = ..., checkpoint_id: _Optional[str] = ..., verification_id: _Optional[str] = ..., deferred_files: _Optional[_Iterable[str]] = ..., lazy_pages: _Optional[bool] = ...) -> None: ...

class CompleteRestoreRequest(_message.Message):
    __slots__ = ("container_id", "init_pid", "gpu_map")
    class GpuMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    INIT_PID_FIELD_NUMBER: _ClassVar[int]
    GPU_MAP_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    init_pid: int
    gpu_map: _containers.ScalarMap[str, str]
    def __init__(self, container_id: _Optional[str] = ..., init_pid: _Optional[int] = ..., gpu_map: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CompleteRestoreResponse(_message.Message):
    __slots__ = ("cuda_pids",)
    CUDA_PIDS_FIELD_NUMBER: _ClassVar[int]
    cuda_pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cuda_pids: _Optional[_Iterable[int]] = ...) -> None: ...

class GpuLockRequest(_message.Message):
    __slots__ = ("container_id", "init_pid", "timeout_ms")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    INIT_PID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    init_pid: int
    timeout_ms: int
    def __init__(self, container_id: _Optional[str] = ..., init_pid: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class GpuLockResponse(_message.Message):
    __slots__ = ("cuda_pids",)
    CUDA_PIDS_FIELD_NUMBER: _ClassVar[int]
    cuda_pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cuda_pids: _Optional[_Iterable[int]] = ...) -> None: ...

class CheckpointRecord(_message.Message):
    __slots__ = ("id", "name", "state", "tier", "dirty", "size_bytes", "file_count", "container_id", "namespace", "image", "created_at", "error", "local_path", "pod_namespace", "shared_with")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DIRTY_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PATH_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SHARED_WITH_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    state: str
    tier: str
    dirty: bool
    size_bytes: int
    file_count: int
    container_id: str
    namespace: str
    image: str
    created_at: str
    error: str
    local_path: str
    pod_namespace: str
    shared_with: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., tier: _Optional[str] = ..., dirty: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., file_count: _Optional[int] = ..., container_id: _Optional[str] = ..., namespace: _Optional[str] = ..., image: _Optional[str] = ..., created_at: _Optional[str] = ..., error: _Optional[str] = ..., local_path: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., shared_with: _Optional[_Iterable[str]] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointRecord]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointRecord, _Mapping]]] = ...) -> None: ...

class ShareCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint", "namespace", "pod_namespace", "revoke")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    namespace: str
    pod_namespace: str
    revoke: bool
    def __init__(self, checkpoint: _Optional[str] = ..., namespace: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., revoke: _Optional[bool] = ...) -> None: ...

class ShareCheckpointResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: CheckpointRecord
    def __init__(self, record: _Optional[_Union[CheckpointRecord, _Mapping]] = ...) -> None: ...

class InspectCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    def __init__(self, checkpoint: _Optional[str] = ...) -> None: ...

class InspectCheckpointResponse(_message.Message):
    __slots__ = ("record", "metadata_json")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    record: CheckpointRecord
    metadata_json: str
    def __init__(self, record: _Optional[_Union[CheckpointRecord, _Mapping]] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("probe_tiers",)
    PROBE_TIERS_FIELD_NUMBER: _ClassVar[int]
    probe_tiers: bool
    def __init__(self, probe_tiers: _Optional[bool] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "cuda_backend", "local_tier", "remote_tier", "dirty_count", "checkpoints_in_flight", "criu_version", "local_tier_free_bytes", "local_tier_error", "remote_tier_error", "runc_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_BACKEND_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TIER_FIELD_NUMBER: _ClassVar[int]
    REMOTE_TIER_FIELD_NUMBER: _ClassVar[int]
    DIRTY_COUNT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CRIU_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TIER_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_TIER_ERROR_FIELD_NUMBER: _ClassVar[int]
    REMOTE_TIER_ERROR_FIELD_NUMBER: _ClassVar[int]
    RUNC_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    cuda_backend: str
    local_tier: str
    remote_tier: str
    dirty_count: int
    checkpoints_in_flight: int
    criu_version: str
    local_tier_free_bytes: int
    local_tier_error: str
    remote_tier_error: str
    runc_version: str
    def __init__(self, version: _Optional[str] = ..., cuda_backend: _Optional[str] = ..., local_tier: _Optional[str] = ..., remote_tier: _Optional[str] = ..., dirty_count: _Optional[int] = ..., checkpoints_in_flight: _Optional[int] = ..., criu_version: _Optional[str] = ..., local_tier_free_bytes: _Optional[int] = ..., local_tier_error: _Optional[str] = ..., remote_tier_error: _Optional[str] = ..., runc_version: _Optional[str] = ...) -> None: ...

class DeleteCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint", "remote")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    remote: bool
    def __init__(self, checkpoint: _Optional[str] = ..., remote: _Optional[bool] = ...) -> None: ...

class DeleteCheckpointResponse(_message.Message):
    __slots__ = ("record", "removed_local", "removed_remote")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    REMOVED_LOCAL_FIELD_NUMBER: _ClassVar[int]
    REMOVED_REMOTE_FIELD_NUMBER: _ClassVar[int]
    record: CheckpointRecord
    removed_local: bool
    removed_remote: bool
    def __init__(self, record: _Optional[_Union[CheckpointRecord, _Mapping]] = ..., removed_local: _Optional[bool] = ..., removed_remote: _Optional[bool] = ...) -> None: ...

class CollectGarbageRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class CollectedCheckpoint(_message.Message):
    __slots__ = ("record", "scope", "reason")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    record: CheckpointRecord
    scope: str
    reason: str
    def __init__(self, record: _Optional[_Union[CheckpointRecord, _Mapping]] = ..., scope: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("collected", "freed_local_bytes", "freed_remote_bytes", "kept")
    COLLECTED_FIELD_NUMBER: _ClassVar[int]
    FREED_LOCAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREED_REMOTE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    collected: _containers.RepeatedCompositeFieldContainer[CollectedCheckpoint]
    freed_local_bytes: int
    freed_remote_bytes: int
    kept: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collected: _Optional[_Iterable[_Union[CollectedCheckpoint, _Mapping]]] = ..., freed_local_bytes: _Optional[int] = ..., freed_remote_bytes: _Optional[int] = ..., kept: _Optional[_Iterable[str]] = ...) -> None: ...

class PromoteCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    def __init__(self, checkpoint: _Optional[str] = ...) -> None: ...

class FetchCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint", "namespace", "pod_namespace")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    namespace: str
    pod_namespace: str
    def __init__(self, checkpoint: _Optional[str] = ..., namespace: _Optional[str] = ..., pod_namespace: _Optional[str] = ...) -> None: ...

class ExportCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint", "reference")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    reference: str
    def __init__(self, checkpoint: _Optional[str] = ..., reference: _Optional[str] = ...) -> None: ...

class ImportCheckpointRequest(_message.Message):
    __slots__ = ("reference", "namespace", "pod_namespace", "name")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    reference: str
    namespace: str
    pod_namespace: str
    name: str
    def __init__(self, reference: _Optional[str] = ..., namespace: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class VerifyCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    def __init__(self, checkpoint: _Optional[str] = ...) -> None: ...

class TransferProgress(_message.Message):
    __slots__ = ("step", "done_bytes", "total_bytes", "record", "digest")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    step: str
    done_bytes: int
    total_bytes: int
    record: CheckpointRecord
    digest: str
    def __init__(self, step: _Optional[str] = ..., done_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., record: _Optional[_Union[CheckpointRecord, _Mapping]] = ..., digest: _Optional[str] = ...) -> None: ...

class ReserveCheckpointRequest(_message.Message):
    __slots__ = ("namespace", "container_id", "name", "ttl_ms", "release")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    container_id: str
    name: str
    ttl_ms: int
    release: bool
    def __init__(self, namespace: _Optional[str] = ..., container_id: _Optional[str] = ..., name: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., release: _Optional[bool] = ...) -> None: ...

class ReserveCheckpointResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AwaitVerificationRequest(_message.Message):
    __slots__ = ("verification_id",)
    VERIFICATION_ID_FIELD_NUMBER: _ClassVar[int]
    verification_id: str
    def __init__(self, verification_id: _Optional[str] = ...) -> None: ...

class AwaitVerificationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
