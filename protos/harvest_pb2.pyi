from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_HOST: _ClassVar[Backend]
    BACKEND_CUDA_VMM: _ClassVar[Backend]
    BACKEND_CUDA_IPC: _ClassVar[Backend]

class LeaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATE_UNSPECIFIED: _ClassVar[LeaseState]
    GRANTED: _ClassVar[LeaseState]
    REVOKING: _ClassVar[LeaseState]
    RELEASED: _ClassVar[LeaseState]
    EXPIRED: _ClassVar[LeaseState]
    REVOKED: _ClassVar[LeaseState]

class LenderState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LENDER_STATE_UNSPECIFIED: _ClassVar[LenderState]
    LENDER_UP: _ClassVar[LenderState]
    LENDER_DRAINING: _ClassVar[LenderState]
    LENDER_DOWN: _ClassVar[LenderState]
BACKEND_UNSPECIFIED: Backend
BACKEND_HOST: Backend
BACKEND_CUDA_VMM: Backend
BACKEND_CUDA_IPC: Backend
LEASE_STATE_UNSPECIFIED: LeaseState
GRANTED: LeaseState
REVOKING: LeaseState
RELEASED: LeaseState
EXPIRED: LeaseState
REVOKED: LeaseState
LENDER_STATE_UNSPECIFIED: LenderState
LENDER_UP: LenderState
LENDER_DRAINING: LenderState
LENDER_DOWN: LenderState

class GpuLink(_message.Message):
    __slots__ = ("peer_uuid", "nvlinks")
    PEER_UUID_FIELD_NUMBER: _ClassVar[int]
    NVLINKS_FIELD_NUMBER: _ClassVar[int]
    peer_uuid: str
    nvlinks: int
    def __init__(self, peer_uuid: _Optional[str] = ..., nvlinks: _Optional[int] = ...) -> None: ...

class Lender(_message.Message):
    __slots__ = ("id", "node", "backend", "gpu_uuid", "gpu_index", "links", "pickup_address", "capacity", "reclaimed", "granted", "generation", "state", "last_report", "pid", "granularity", "device_total", "device_free", "ray_node_id", "tenant_bytes", "tenant_peak", "peak_window_s")
    ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDEX_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    PICKUP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FREE_FIELD_NUMBER: _ClassVar[int]
    RAY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENANT_PEAK_FIELD_NUMBER: _ClassVar[int]
    PEAK_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    id: str
    node: str
    backend: Backend
    gpu_uuid: str
    gpu_index: int
    links: _containers.RepeatedCompositeFieldContainer[GpuLink]
    pickup_address: str
    capacity: int
    reclaimed: int
    granted: int
    generation: int
    state: LenderState
    last_report: float
    pid: int
    granularity: int
    device_total: int
    device_free: int
    ray_node_id: str
    tenant_bytes: int
    tenant_peak: int
    peak_window_s: float
    def __init__(self, id: _Optional[str] = ..., node: _Optional[str] = ..., backend: _Optional[_Union[Backend, str]] = ..., gpu_uuid: _Optional[str] = ..., gpu_index: _Optional[int] = ..., links: _Optional[_Iterable[_Union[GpuLink, _Mapping]]] = ..., pickup_address: _Optional[str] = ..., capacity: _Optional[int] = ..., reclaimed: _Optional[int] = ..., granted: _Optional[int] = ..., generation: _Optional[int] = ..., state: _Optional[_Union[LenderState, str]] = ..., last_report: _Optional[float] = ..., pid: _Optional[int] = ..., granularity: _Optional[int] = ..., device_total: _Optional[int] = ..., device_free: _Optional[int] = ..., ray_node_id: _Optional[str] = ..., tenant_bytes: _Optional[int] = ..., tenant_peak: _Optional[int] = ..., peak_window_s: _Optional[float] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("id", "lender_id", "nbytes", "state", "ttl_s", "expires_at", "token", "generation", "pickup_address", "backend", "gpu_uuid", "client_id", "holder_pid", "node", "priority", "created_at", "reason", "revoke_deadline", "lender_generation")
    ID_FIELD_NUMBER: _ClassVar[int]
    LENDER_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PICKUP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_PID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVOKE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    LENDER_GENERATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    lender_id: str
    nbytes: int
    state: LeaseState
    ttl_s: float
    expires_at: float
    token: bytes
    generation: int
    pickup_address: str
    backend: Backend
    gpu_uuid: str
    client_id: str
    holder_pid: int
    node: str
    priority: int
    created_at: float
    reason: str
    revoke_deadline: float
    lender_generation: int
    def __init__(self, id: _Optional[str] = ..., lender_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., state: _Optional[_Union[LeaseState, str]] = ..., ttl_s: _Optional[float] = ..., expires_at: _Optional[float] = ..., token: _Optional[bytes] = ..., generation: _Optional[int] = ..., pickup_address: _Optional[str] = ..., backend: _Optional[_Union[Backend, str]] = ..., gpu_uuid: _Optional[str] = ..., client_id: _Optional[str] = ..., holder_pid: _Optional[int] = ..., node: _Optional[str] = ..., priority: _Optional[int] = ..., created_at: _Optional[float] = ..., reason: _Optional[str] = ..., revoke_deadline: _Optional[float] = ..., lender_generation: _Optional[int] = ...) -> None: ...

class RegisterLenderRequest(_message.Message):
    __slots__ = ("lender",)
    LENDER_FIELD_NUMBER: _ClassVar[int]
    lender: Lender
    def __init__(self, lender: _Optional[_Union[Lender, _Mapping]] = ...) -> None: ...

class RegisterLenderReply(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class ReportLenderRequest(_message.Message):
    __slots__ = ("lender_id", "generation", "capacity", "device_total", "device_free", "tenant_bytes", "tenant_peak", "peak_window_s")
    LENDER_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FREE_FIELD_NUMBER: _ClassVar[int]
    TENANT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENANT_PEAK_FIELD_NUMBER: _ClassVar[int]
    PEAK_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    lender_id: str
    generation: int
    capacity: int
    device_total: int
    device_free: int
    tenant_bytes: int
    tenant_peak: int
    peak_window_s: float
    def __init__(self, lender_id: _Optional[str] = ..., generation: _Optional[int] = ..., capacity: _Optional[int] = ..., device_total: _Optional[int] = ..., device_free: _Optional[int] = ..., tenant_bytes: _Optional[int] = ..., tenant_peak: _Optional[int] = ..., peak_window_s: _Optional[float] = ...) -> None: ...

class ReportLenderReply(_message.Message):
    __slots__ = ("reclaimed",)
    RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    reclaimed: int
    def __init__(self, reclaimed: _Optional[int] = ...) -> None: ...

class WatchLenderRequest(_message.Message):
    __slots__ = ("lender_id", "generation")
    LENDER_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    lender_id: str
    generation: int
    def __init__(self, lender_id: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class LenderEvent(_message.Message):
    __slots__ = ("kind", "lease_id", "nbytes", "clean")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[LenderEvent.Kind]
        FREE: _ClassVar[LenderEvent.Kind]
    KIND_UNSPECIFIED: LenderEvent.Kind
    FREE: LenderEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CLEAN_FIELD_NUMBER: _ClassVar[int]
    kind: LenderEvent.Kind
    lease_id: str
    nbytes: int
    clean: bool
    def __init__(self, kind: _Optional[_Union[LenderEvent.Kind, str]] = ..., lease_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., clean: bool = ...) -> None: ...

class ConfirmFreeRequest(_message.Message):
    __slots__ = ("lender_id", "generation", "lease_ids")
    LENDER_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    lender_id: str
    generation: int
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lender_id: _Optional[str] = ..., generation: _Optional[int] = ..., lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ConfirmFreeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckPickupRequest(_message.Message):
    __slots__ = ("lender_id", "lender_generation", "lease_id", "token", "lease_generation", "holder_pid", "holder_uid")
    LENDER_ID_FIELD_NUMBER: _ClassVar[int]
    LENDER_GENERATION_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    HOLDER_PID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_UID_FIELD_NUMBER: _ClassVar[int]
    lender_id: str
    lender_generation: int
    lease_id: str
    token: bytes
    lease_generation: int
    holder_pid: int
    holder_uid: int
    def __init__(self, lender_id: _Optional[str] = ..., lender_generation: _Optional[int] = ..., lease_id: _Optional[str] = ..., token: _Optional[bytes] = ..., lease_generation: _Optional[int] = ..., holder_pid: _Optional[int] = ..., holder_uid: _Optional[int] = ...) -> None: ...

class CheckPickupReply(_message.Message):
    __slots__ = ("nbytes", "expires_at")
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    nbytes: int
    expires_at: float
    def __init__(self, nbytes: _Optional[int] = ..., expires_at: _Optional[float] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("client_id", "nbytes", "ttl_s", "node", "near_gpu", "priority", "holder_pid", "backend", "avoid_lenders")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    NEAR_GPU_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    HOLDER_PID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    AVOID_LENDERS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    nbytes: int
    ttl_s: float
    node: str
    near_gpu: str
    priority: int
    holder_pid: int
    backend: Backend
    avoid_lenders: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, client_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., ttl_s: _Optional[float] = ..., node: _Optional[str] = ..., near_gpu: _Optional[str] = ..., priority: _Optional[int] = ..., holder_pid: _Optional[int] = ..., backend: _Optional[_Union[Backend, str]] = ..., avoid_lenders: _Optional[_Iterable[str]] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("client_id", "lease_ids")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, client_id: _Optional[str] = ..., lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class KeepAliveReply(_message.Message):
    __slots__ = ("alive", "lost")
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    alive: _containers.RepeatedCompositeFieldContainer[Lease]
    lost: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, alive: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., lost: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("client_id", "lease_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    lease_id: str
    def __init__(self, client_id: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class AckRevokeRequest(_message.Message):
    __slots__ = ("client_id", "lease_id")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    lease_id: str
    def __init__(self, client_id: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class AckRevokeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class LeaseEvent(_message.Message):
    __slots__ = ("kind", "lease")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[LeaseEvent.Kind]
        REVOKE: _ClassVar[LeaseEvent.Kind]
        ENDED: _ClassVar[LeaseEvent.Kind]
        HELLO: _ClassVar[LeaseEvent.Kind]
    KIND_UNSPECIFIED: LeaseEvent.Kind
    REVOKE: LeaseEvent.Kind
    ENDED: LeaseEvent.Kind
    HELLO: LeaseEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    kind: LeaseEvent.Kind
    lease: Lease
    def __init__(self, kind: _Optional[_Union[LeaseEvent.Kind, str]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("lease_id", "reason", "force")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    force: bool
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ..., force: bool = ...) -> None: ...

class RevokeReply(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("lender_id", "timeout_s")
    LENDER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    lender_id: str
    timeout_s: float
    def __init__(self, lender_id: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("revoked", "freed")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    FREED_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedScalarFieldContainer[str]
    freed: bool
    def __init__(self, revoked: _Optional[_Iterable[str]] = ..., freed: bool = ...) -> None: ...

class ReclaimRequest(_message.Message):
    __slots__ = ("lender_id", "nbytes", "timeout_s")
    LENDER_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    lender_id: str
    nbytes: int
    timeout_s: float
    def __init__(self, lender_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ReclaimReply(_message.Message):
    __slots__ = ("revoked", "reclaimed", "freed", "elapsed_s")
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    FREED_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedScalarFieldContainer[str]
    reclaimed: int
    freed: bool
    elapsed_s: float
    def __init__(self, revoked: _Optional[_Iterable[str]] = ..., reclaimed: _Optional[int] = ..., freed: bool = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("lender_id", "nbytes")
    LENDER_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    lender_id: str
    nbytes: int
    def __init__(self, lender_id: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class RestoreReply(_message.Message):
    __slots__ = ("reclaimed",)
    RECLAIMED_FIELD_NUMBER: _ClassVar[int]
    reclaimed: int
    def __init__(self, reclaimed: _Optional[int] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("lender_id", "include_ended", "client_id")
    LENDER_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ENDED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    lender_id: str
    include_ended: bool
    client_id: str
    def __init__(self, lender_id: _Optional[str] = ..., include_ended: bool = ..., client_id: _Optional[str] = ...) -> None: ...

class ListLeasesReply(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class ListLendersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLendersReply(_message.Message):
    __slots__ = ("lenders",)
    LENDERS_FIELD_NUMBER: _ClassVar[int]
    lenders: _containers.RepeatedCompositeFieldContainer[Lender]
    def __init__(self, lenders: _Optional[_Iterable[_Union[Lender, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "address", "store_path", "started_at", "lenders_up", "leases_active", "bytes_lendable", "bytes_granted", "generation", "pid")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STORE_PATH_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    LENDERS_UP_FIELD_NUMBER: _ClassVar[int]
    LEASES_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    BYTES_LENDABLE_FIELD_NUMBER: _ClassVar[int]
    BYTES_GRANTED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    version: str
    address: str
    store_path: str
    started_at: float
    lenders_up: int
    leases_active: int
    bytes_lendable: int
    bytes_granted: int
    generation: int
    pid: int
    def __init__(self, version: _Optional[str] = ..., address: _Optional[str] = ..., store_path: _Optional[str] = ..., started_at: _Optional[float] = ..., lenders_up: _Optional[int] = ..., leases_active: _Optional[int] = ..., bytes_lendable: _Optional[int] = ..., bytes_granted: _Optional[int] = ..., generation: _Optional[int] = ..., pid: _Optional[int] = ...) -> None: ...

class PickupRequest(_message.Message):
    __slots__ = ("lease_id", "token", "generation", "room", "timeout_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ROOM_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    token: bytes
    generation: int
    room: int
    timeout_s: float
    def __init__(self, lease_id: _Optional[str] = ..., token: _Optional[bytes] = ..., generation: _Optional[int] = ..., room: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class PickupReply(_message.Message):
    __slots__ = ("ok", "error_code", "error_message", "nbytes", "alloc_bytes", "backend", "gpu_uuid", "ipc_handle", "offset", "elapsed_s", "lendable")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOC_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    LENDABLE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error_code: str
    error_message: str
    nbytes: int
    alloc_bytes: int
    backend: Backend
    gpu_uuid: str
    ipc_handle: bytes
    offset: int
    elapsed_s: float
    lendable: int
    def __init__(self, ok: bool = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., nbytes: _Optional[int] = ..., alloc_bytes: _Optional[int] = ..., backend: _Optional[_Union[Backend, str]] = ..., gpu_uuid: _Optional[str] = ..., ipc_handle: _Optional[bytes] = ..., offset: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., lendable: _Optional[int] = ...) -> None: ...
