import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_PENDING: _ClassVar[ReplicaState]
    REPLICA_STATE_PULLING: _ClassVar[ReplicaState]
    REPLICA_STATE_STARTING: _ClassVar[ReplicaState]
    REPLICA_STATE_READY: _ClassVar[ReplicaState]
    REPLICA_STATE_FAILED: _ClassVar[ReplicaState]

class RolloutStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STRATEGY_UNSPECIFIED: _ClassVar[RolloutStrategy]
    ROLLOUT_STRATEGY_ROLLING: _ClassVar[RolloutStrategy]
    ROLLOUT_STRATEGY_CANARY: _ClassVar[RolloutStrategy]

class RolloutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STATE_UNSPECIFIED: _ClassVar[RolloutState]
    ROLLOUT_STATE_STABLE: _ClassVar[RolloutState]
    ROLLOUT_STATE_PROGRESSING: _ClassVar[RolloutState]
    ROLLOUT_STATE_FIXED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ROLLED_BACK: _ClassVar[RolloutState]
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_PENDING: ReplicaState
REPLICA_STATE_PULLING: ReplicaState
REPLICA_STATE_STARTING: ReplicaState
REPLICA_STATE_READY: ReplicaState
REPLICA_STATE_FAILED: ReplicaState
ROLLOUT_STRATEGY_UNSPECIFIED: RolloutStrategy
ROLLOUT_STRATEGY_ROLLING: RolloutStrategy
ROLLOUT_STRATEGY_CANARY: RolloutStrategy
ROLLOUT_STATE_UNSPECIFIED: RolloutState
ROLLOUT_STATE_STABLE: RolloutState
ROLLOUT_STATE_PROGRESSING: RolloutState
ROLLOUT_STATE_FIXED: RolloutState
ROLLOUT_STATE_ROLLED_BACK: RolloutState

class MiddlewareSpec(_message.Message):
    __slots__ = ("name", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    options: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ImageConfiguration(_message.Message):
    __slots__ = ("system_prompt", "context_size", "temperature", "top_p", "max_tokens", "allowed_groups", "middleware", "chat_template", "slots", "threads", "batch_size")
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MIDDLEWARE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    system_prompt: str
    context_size: int
    temperature: float
    top_p: float
    max_tokens: int
    allowed_groups: _containers.RepeatedScalarFieldContainer[str]
    middleware: _containers.RepeatedCompositeFieldContainer[MiddlewareSpec]
    chat_template: str
    slots: int
    threads: int
    batch_size: int
    def __init__(self, system_prompt: _Optional[str] = ..., context_size: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_tokens: _Optional[int] = ..., allowed_groups: _Optional[_Iterable[str]] = ..., middleware: _Optional[_Iterable[_Union[MiddlewareSpec, _Mapping]]] = ..., chat_template: _Optional[str] = ..., slots: _Optional[int] = ..., threads: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("alias", "source_url", "configuration", "digest", "size_bytes", "create_time", "model_shape", "credentials_ref", "credentials_username")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URL_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_REF_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_USERNAME_FIELD_NUMBER: _ClassVar[int]
    alias: str
    source_url: str
    configuration: ImageConfiguration
    digest: str
    size_bytes: int
    create_time: _timestamp_pb2.Timestamp
    model_shape: ModelShape
    credentials_ref: str
    credentials_username: str
    def __init__(self, alias: _Optional[str] = ..., source_url: _Optional[str] = ..., configuration: _Optional[_Union[ImageConfiguration, _Mapping]] = ..., digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_shape: _Optional[_Union[ModelShape, _Mapping]] = ..., credentials_ref: _Optional[str] = ..., credentials_username: _Optional[str] = ...) -> None: ...

class ModelShape(_message.Message):
    __slots__ = ("layers", "embedding_length", "heads", "kv_heads", "train_context", "file_bytes")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    layers: int
    embedding_length: int
    heads: int
    kv_heads: int
    train_context: int
    file_bytes: int
    def __init__(self, layers: _Optional[int] = ..., embedding_length: _Optional[int] = ..., heads: _Optional[int] = ..., kv_heads: _Optional[int] = ..., train_context: _Optional[int] = ..., file_bytes: _Optional[int] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "image", "replicas", "ready_replicas", "create_time", "update_time", "node_selector", "memory_bytes", "gpus", "min_replicas", "max_replicas", "target_in_flight", "scale_to_zero_after_s", "events", "priority", "slots", "threads", "context_size", "batch_size")
    class NodeSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SCALE_TO_ZERO_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    image: str
    replicas: int
    ready_replicas: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    node_selector: _containers.ScalarMap[str, str]
    memory_bytes: int
    gpus: int
    min_replicas: int
    max_replicas: int
    target_in_flight: float
    scale_to_zero_after_s: int
    events: _containers.RepeatedCompositeFieldContainer[DeploymentEvent]
    priority: int
    slots: int
    threads: int
    context_size: int
    batch_size: int
    def __init__(self, name: _Optional[str] = ..., image: _Optional[str] = ..., replicas: _Optional[int] = ..., ready_replicas: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., node_selector: _Optional[_Mapping[str, str]] = ..., memory_bytes: _Optional[int] = ..., gpus: _Optional[int] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., target_in_flight: _Optional[float] = ..., scale_to_zero_after_s: _Optional[int] = ..., events: _Optional[_Iterable[_Union[DeploymentEvent, _Mapping]]] = ..., priority: _Optional[int] = ..., slots: _Optional[int] = ..., threads: _Optional[int] = ..., context_size: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class DeploymentEvent(_message.Message):
    __slots__ = ("time", "reason", "message", "replica")
    TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    reason: str
    message: str
    replica: str
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., replica: _Optional[str] = ...) -> None: ...

class DeploymentEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[DeploymentEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[DeploymentEvent, _Mapping]]] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("id", "deployment", "node", "state", "message", "image_digest", "pid", "endpoint", "restarts", "update_time", "slot", "template_hash")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_HASH_FIELD_NUMBER: _ClassVar[int]
    id: str
    deployment: str
    node: str
    state: ReplicaState
    message: str
    image_digest: str
    pid: int
    endpoint: str
    restarts: int
    update_time: _timestamp_pb2.Timestamp
    slot: int
    template_hash: str
    def __init__(self, id: _Optional[str] = ..., deployment: _Optional[str] = ..., node: _Optional[str] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., message: _Optional[str] = ..., image_digest: _Optional[str] = ..., pid: _Optional[int] = ..., endpoint: _Optional[str] = ..., restarts: _Optional[int] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., slot: _Optional[int] = ..., template_hash: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "storage_address", "labels", "memory_bytes", "cpus", "store_free_bytes", "start_time", "gpus", "blob_digests")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STORAGE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    STORE_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    BLOB_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    storage_address: str
    labels: _containers.ScalarMap[str, str]
    memory_bytes: int
    cpus: int
    store_free_bytes: int
    start_time: _timestamp_pb2.Timestamp
    gpus: int
    blob_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., storage_address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., memory_bytes: _Optional[int] = ..., cpus: _Optional[int] = ..., store_free_bytes: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., gpus: _Optional[int] = ..., blob_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class ControllerLeader(_message.Message):
    __slots__ = ("identity", "address", "acquire_time")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ACQUIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    identity: str
    address: str
    acquire_time: _timestamp_pb2.Timestamp
    def __init__(self, identity: _Optional[str] = ..., address: _Optional[str] = ..., acquire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RolloutPolicy(_message.Message):
    __slots__ = ("strategy", "steps", "interval_s", "max_error_rate", "max_ttft_ratio")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_TTFT_RATIO_FIELD_NUMBER: _ClassVar[int]
    strategy: RolloutStrategy
    steps: _containers.RepeatedScalarFieldContainer[int]
    interval_s: float
    max_error_rate: float
    max_ttft_ratio: float
    def __init__(self, strategy: _Optional[_Union[RolloutStrategy, str]] = ..., steps: _Optional[_Iterable[int]] = ..., interval_s: _Optional[float] = ..., max_error_rate: _Optional[float] = ..., max_ttft_ratio: _Optional[float] = ...) -> None: ...

class Revision(_message.Message):
    __slots__ = ("number", "deployment", "template", "create_time", "spec", "change")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    number: int
    deployment: str
    template: Deployment
    create_time: _timestamp_pb2.Timestamp
    spec: str
    change: str
    def __init__(self, number: _Optional[int] = ..., deployment: _Optional[str] = ..., template: _Optional[_Union[Deployment, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spec: _Optional[str] = ..., change: _Optional[str] = ...) -> None: ...

class TrafficTarget(_message.Message):
    __slots__ = ("revision", "percent")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    revision: int
    percent: int
    def __init__(self, revision: _Optional[int] = ..., percent: _Optional[int] = ...) -> None: ...

class RevisionCounters(_message.Message):
    __slots__ = ("service", "revision", "requests", "errors", "ttft_buckets", "ttft_bounds", "ttft_count")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    TTFT_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    TTFT_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    TTFT_COUNT_FIELD_NUMBER: _ClassVar[int]
    service: str
    revision: int
    requests: int
    errors: int
    ttft_buckets: _containers.RepeatedScalarFieldContainer[int]
    ttft_bounds: _containers.RepeatedScalarFieldContainer[float]
    ttft_count: int
    def __init__(self, service: _Optional[str] = ..., revision: _Optional[int] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., ttft_buckets: _Optional[_Iterable[int]] = ..., ttft_bounds: _Optional[_Iterable[float]] = ..., ttft_count: _Optional[int] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("state", "stable_revision", "candidate_revision", "step", "step_start_time", "start_time", "message", "policy", "baseline", "baseline_time")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STABLE_REVISION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_START_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_TIME_FIELD_NUMBER: _ClassVar[int]
    state: RolloutState
    stable_revision: int
    candidate_revision: int
    step: int
    step_start_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    message: str
    policy: RolloutPolicy
    baseline: _containers.RepeatedCompositeFieldContainer[RevisionCounters]
    baseline_time: _timestamp_pb2.Timestamp
    def __init__(self, state: _Optional[_Union[RolloutState, str]] = ..., stable_revision: _Optional[int] = ..., candidate_revision: _Optional[int] = ..., step: _Optional[int] = ..., step_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message: _Optional[str] = ..., policy: _Optional[_Union[RolloutPolicy, _Mapping]] = ..., baseline: _Optional[_Iterable[_Union[RevisionCounters, _Mapping]]] = ..., baseline_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RevisionMetrics(_message.Message):
    __slots__ = ("revision", "requests", "errors", "request_rate", "error_rate", "p95_ttft_s", "window_s")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    P95_TTFT_S_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    revision: int
    requests: int
    errors: int
    request_rate: float
    error_rate: float
    p95_ttft_s: float
    window_s: float
    def __init__(self, revision: _Optional[int] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., request_rate: _Optional[float] = ..., error_rate: _Optional[float] = ..., p95_ttft_s: _Optional[float] = ..., window_s: _Optional[float] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("name", "revisions", "traffic", "rollout", "create_time", "update_time", "events", "metrics")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    revisions: _containers.RepeatedCompositeFieldContainer[Revision]
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficTarget]
    rollout: RolloutStatus
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    events: _containers.RepeatedCompositeFieldContainer[DeploymentEvent]
    metrics: _containers.RepeatedCompositeFieldContainer[RevisionMetrics]
    def __init__(self, name: _Optional[str] = ..., revisions: _Optional[_Iterable[_Union[Revision, _Mapping]]] = ..., traffic: _Optional[_Iterable[_Union[TrafficTarget, _Mapping]]] = ..., rollout: _Optional[_Union[RolloutStatus, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., events: _Optional[_Iterable[_Union[DeploymentEvent, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[RevisionMetrics, _Mapping]]] = ...) -> None: ...

class RevisionTrafficReport(_message.Message):
    __slots__ = ("balancer", "revisions", "report_time")
    BALANCER_FIELD_NUMBER: _ClassVar[int]
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIME_FIELD_NUMBER: _ClassVar[int]
    balancer: str
    revisions: _containers.RepeatedCompositeFieldContainer[RevisionCounters]
    report_time: _timestamp_pb2.Timestamp
    def __init__(self, balancer: _Optional[str] = ..., revisions: _Optional[_Iterable[_Union[RevisionCounters, _Mapping]]] = ..., report_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
