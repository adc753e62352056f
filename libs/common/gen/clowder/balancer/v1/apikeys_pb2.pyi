import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BudgetPeriod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_PERIOD_UNSPECIFIED: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_DAY: _ClassVar[BudgetPeriod]
    BUDGET_PERIOD_MONTH: _ClassVar[BudgetPeriod]

class PriorityClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_CLASS_UNSPECIFIED: _ClassVar[PriorityClass]
    PRIORITY_CLASS_CRITICAL: _ClassVar[PriorityClass]
    PRIORITY_CLASS_STANDARD: _ClassVar[PriorityClass]
    PRIORITY_CLASS_SHEDDABLE: _ClassVar[PriorityClass]
BUDGET_PERIOD_UNSPECIFIED: BudgetPeriod
BUDGET_PERIOD_DAY: BudgetPeriod
BUDGET_PERIOD_MONTH: BudgetPeriod
PRIORITY_CLASS_UNSPECIFIED: PriorityClass
PRIORITY_CLASS_CRITICAL: PriorityClass
PRIORITY_CLASS_STANDARD: PriorityClass
PRIORITY_CLASS_SHEDDABLE: PriorityClass

class ApiKey(_message.Message):
    __slots__ = ("id", "description", "groups", "create_time", "limits")
    ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    description: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    limits: KeyLimits
    def __init__(self, id: _Optional[str] = ..., description: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ...) -> None: ...

class KeyLimits(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute", "budget_tokens", "budget_period", "priority")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    budget_tokens: int
    budget_period: BudgetPeriod
    priority: PriorityClass
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., budget_tokens: _Optional[int] = ..., budget_period: _Optional[_Union[BudgetPeriod, str]] = ..., priority: _Optional[_Union[PriorityClass, str]] = ...) -> None: ...

class StoredApiKey(_message.Message):
    __slots__ = ("api_key", "secret_sha256")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_SHA256_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    secret_sha256: str
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret_sha256: _Optional[str] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("description", "groups", "limits")
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    description: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    limits: KeyLimits
    def __init__(self, description: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "key")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    key: str
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class GetApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("api_keys", "next_page_token")
    API_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    api_keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, api_keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateApiKeyRequest(_message.Message):
    __slots__ = ("id", "description", "groups", "limits", "update_mask")
    ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    id: str
    description: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    limits: KeyLimits
    update_mask: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., description: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ..., update_mask: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class DeleteApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteApiKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("key", "group", "model", "start_date", "end_date")
    KEY_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_DATE_FIELD_NUMBER: _ClassVar[int]
    END_DATE_FIELD_NUMBER: _ClassVar[int]
    key: str
    group: str
    model: str
    start_date: str
    end_date: str
    def __init__(self, key: _Optional[str] = ..., group: _Optional[str] = ..., model: _Optional[str] = ..., start_date: _Optional[str] = ..., end_date: _Optional[str] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("key", "model", "date", "groups", "requests", "prompt_tokens", "cached_prompt_tokens", "completion_tokens")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    key: str
    model: str
    date: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    def __init__(self, key: _Optional[str] = ..., model: _Optional[str] = ..., date: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("records", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "requests")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[UsageRecord]
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    requests: int
    def __init__(self, records: _Optional[_Iterable[_Union[UsageRecord, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., requests: _Optional[int] = ...) -> None: ...

class QuotaState(_message.Message):
    __slots__ = ("requests_tat", "tokens_tat", "budget_period", "budget_used", "budget_reserved", "request_times")
    REQUESTS_TAT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TAT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_RESERVED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMES_FIELD_NUMBER: _ClassVar[int]
    requests_tat: float
    tokens_tat: float
    budget_period: str
    budget_used: int
    budget_reserved: int
    request_times: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, requests_tat: _Optional[float] = ..., tokens_tat: _Optional[float] = ..., budget_period: _Optional[str] = ..., budget_used: _Optional[int] = ..., budget_reserved: _Optional[int] = ..., request_times: _Optional[_Iterable[float]] = ...) -> None: ...

class GroupLimits(_message.Message):
    __slots__ = ("group", "limits")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    group: str
    limits: KeyLimits
    def __init__(self, group: _Optional[str] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ...) -> None: ...

class SetGroupLimitsRequest(_message.Message):
    __slots__ = ("group", "limits")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    group: str
    limits: KeyLimits
    def __init__(self, group: _Optional[str] = ..., limits: _Optional[_Union[KeyLimits, _Mapping]] = ...) -> None: ...

class SetGroupLimitsResponse(_message.Message):
    __slots__ = ("group_limits",)
    GROUP_LIMITS_FIELD_NUMBER: _ClassVar[int]
    group_limits: GroupLimits
    def __init__(self, group_limits: _Optional[_Union[GroupLimits, _Mapping]] = ...) -> None: ...

class ListGroupLimitsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGroupLimitsResponse(_message.Message):
    __slots__ = ("group_limits",)
    GROUP_LIMITS_FIELD_NUMBER: _ClassVar[int]
    group_limits: _containers.RepeatedCompositeFieldContainer[GroupLimits]
    def __init__(self, group_limits: _Optional[_Iterable[_Union[GroupLimits, _Mapping]]] = ...) -> None: ...
