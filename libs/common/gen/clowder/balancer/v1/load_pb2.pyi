import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BalancerLoad(_message.Message):
    __slots__ = ("balancer", "deployments", "report_time")
    class DeploymentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: DeploymentLoad
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[DeploymentLoad, _Mapping]] = ...) -> None: ...
    BALANCER_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIME_FIELD_NUMBER: _ClassVar[int]
    balancer: str
    deployments: _containers.MessageMap[str, DeploymentLoad]
    report_time: _timestamp_pb2.Timestamp
    def __init__(self, balancer: _Optional[str] = ..., deployments: _Optional[_Mapping[str, DeploymentLoad]] = ..., report_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DeploymentLoad(_message.Message):
    __slots__ = ("in_flight", "waiting", "requests_total", "last_request_time")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    waiting: int
    requests_total: int
    last_request_time: _timestamp_pb2.Timestamp
    def __init__(self, in_flight: _Optional[int] = ..., waiting: _Optional[int] = ..., requests_total: _Optional[int] = ..., last_request_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
