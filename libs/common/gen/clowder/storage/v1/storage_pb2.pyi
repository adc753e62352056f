import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYER_KIND_UNSPECIFIED: _ClassVar[LayerKind]
    LAYER_KIND_MODEL: _ClassVar[LayerKind]
    LAYER_KIND_ADAPTER: _ClassVar[LayerKind]
LAYER_KIND_UNSPECIFIED: LayerKind
LAYER_KIND_MODEL: LayerKind
LAYER_KIND_ADAPTER: LayerKind

class Credentials(_message.Message):
    __slots__ = ("bearer_token", "username", "password", "secret_ref")
    BEARER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    SECRET_REF_FIELD_NUMBER: _ClassVar[int]
    bearer_token: str
    username: str
    password: str
    secret_ref: str
    def __init__(self, bearer_token: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., secret_ref: _Optional[str] = ...) -> None: ...

class Blob(_message.Message):
    __slots__ = ("digest", "size_bytes", "create_time")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    digest: str
    size_bytes: int
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PullProgress(_message.Message):
    __slots__ = ("bytes_done", "bytes_total", "bytes_per_second", "eta_seconds")
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes_done: int
    bytes_total: int
    bytes_per_second: float
    eta_seconds: float
    def __init__(self, bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class PullBlobRequest(_message.Message):
    __slots__ = ("source_url", "expected_digest", "credentials")
    SOURCE_URL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    source_url: str
    expected_digest: str
    credentials: Credentials
    def __init__(self, source_url: _Optional[str] = ..., expected_digest: _Optional[str] = ..., credentials: _Optional[_Union[Credentials, _Mapping]] = ...) -> None: ...

class PullBlobResponse(_message.Message):
    __slots__ = ("progress", "blob")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    progress: PullProgress
    blob: Blob
    def __init__(self, progress: _Optional[_Union[PullProgress, _Mapping]] = ..., blob: _Optional[_Union[Blob, _Mapping]] = ...) -> None: ...

class StatBlobRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class StatBlobResponse(_message.Message):
    __slots__ = ("blob",)
    BLOB_FIELD_NUMBER: _ClassVar[int]
    blob: Blob
    def __init__(self, blob: _Optional[_Union[Blob, _Mapping]] = ...) -> None: ...

class ListBlobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBlobsResponse(_message.Message):
    __slots__ = ("blobs",)
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    blobs: _containers.RepeatedCompositeFieldContainer[Blob]
    def __init__(self, blobs: _Optional[_Iterable[_Union[Blob, _Mapping]]] = ...) -> None: ...

class DeleteBlobRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class DeleteBlobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBlobPathRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class GetBlobPathResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReadBlobRequest(_message.Message):
    __slots__ = ("digest", "offset", "length")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    length: int
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ReadBlobResponse(_message.Message):
    __slots__ = ("data", "size_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    size_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class PutBlobRequest(_message.Message):
    __slots__ = ("data", "expected_digest", "holder", "max_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    expected_digest: str
    holder: str
    max_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., expected_digest: _Optional[str] = ..., holder: _Optional[str] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class PutBlobResponse(_message.Message):
    __slots__ = ("blob",)
    BLOB_FIELD_NUMBER: _ClassVar[int]
    blob: Blob
    def __init__(self, blob: _Optional[_Union[Blob, _Mapping]] = ...) -> None: ...

class LayerSource(_message.Message):
    __slots__ = ("kind", "source_url", "expected_digest", "credentials")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    kind: LayerKind
    source_url: str
    expected_digest: str
    credentials: Credentials
    def __init__(self, kind: _Optional[_Union[LayerKind, str]] = ..., source_url: _Optional[str] = ..., expected_digest: _Optional[str] = ..., credentials: _Optional[_Union[Credentials, _Mapping]] = ...) -> None: ...

class PullImageRequest(_message.Message):
    __slots__ = ("name", "layers", "configuration_json", "source_url", "credentials")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_JSON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URL_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    name: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerSource]
    configuration_json: str
    source_url: str
    credentials: Credentials
    def __init__(self, name: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerSource, _Mapping]]] = ..., configuration_json: _Optional[str] = ..., source_url: _Optional[str] = ..., credentials: _Optional[_Union[Credentials, _Mapping]] = ...) -> None: ...

class LayerProgress(_message.Message):
    __slots__ = ("index", "digest", "progress")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    index: int
    digest: str
    progress: PullProgress
    def __init__(self, index: _Optional[int] = ..., digest: _Optional[str] = ..., progress: _Optional[_Union[PullProgress, _Mapping]] = ...) -> None: ...

class PullImageResponse(_message.Message):
    __slots__ = ("layer", "image")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    layer: LayerProgress
    image: StoredImage
    def __init__(self, layer: _Optional[_Union[LayerProgress, _Mapping]] = ..., image: _Optional[_Union[StoredImage, _Mapping]] = ...) -> None: ...

class StoredLayer(_message.Message):
    __slots__ = ("media_type", "digest", "size_bytes", "path", "title")
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    media_type: str
    digest: str
    size_bytes: int
    path: str
    title: str
    def __init__(self, media_type: _Optional[str] = ..., digest: _Optional[str] = ..., size_bytes: _Optional[int] = ..., path: _Optional[str] = ..., title: _Optional[str] = ...) -> None: ...

class StoredImage(_message.Message):
    __slots__ = ("name", "manifest_digest", "manifest_size_bytes", "config_digest", "configuration_json", "layers", "size_bytes", "complete")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CONFIGURATION_JSON_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    name: str
    manifest_digest: str
    manifest_size_bytes: int
    config_digest: str
    configuration_json: str
    layers: _containers.RepeatedCompositeFieldContainer[StoredLayer]
    size_bytes: int
    complete: bool
    def __init__(self, name: _Optional[str] = ..., manifest_digest: _Optional[str] = ..., manifest_size_bytes: _Optional[int] = ..., config_digest: _Optional[str] = ..., configuration_json: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[StoredLayer, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class PushImageRequest(_message.Message):
    __slots__ = ("name", "target_url", "credentials")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_URL_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    name: str
    target_url: str
    credentials: Credentials
    def __init__(self, name: _Optional[str] = ..., target_url: _Optional[str] = ..., credentials: _Optional[_Union[Credentials, _Mapping]] = ...) -> None: ...

class PushImageResponse(_message.Message):
    __slots__ = ("layer", "manifest_digest")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    layer: LayerProgress
    manifest_digest: str
    def __init__(self, layer: _Optional[_Union[LayerProgress, _Mapping]] = ..., manifest_digest: _Optional[str] = ...) -> None: ...

class ResolveImageRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ResolveImageResponse(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: StoredImage
    def __init__(self, image: _Optional[_Union[StoredImage, _Mapping]] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[StoredImage]
    def __init__(self, images: _Optional[_Iterable[_Union[StoredImage, _Mapping]]] = ...) -> None: ...

class DeleteImageRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteImageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PinBlobsRequest(_message.Message):
    __slots__ = ("holder", "digests", "image", "ttl_seconds")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    holder: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    image: str
    ttl_seconds: int
    def __init__(self, holder: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ..., image: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class PinBlobsResponse(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class UnpinBlobsRequest(_message.Message):
    __slots__ = ("holder", "digests")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    holder: str
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, holder: _Optional[str] = ..., digests: _Optional[_Iterable[str]] = ...) -> None: ...

class UnpinBlobsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CollectGarbageRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("removed_digests", "freed_bytes")
    REMOVED_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    removed_digests: _containers.RepeatedScalarFieldContainer[str]
    freed_bytes: int
    def __init__(self, removed_digests: _Optional[_Iterable[str]] = ..., freed_bytes: _Optional[int] = ...) -> None: ...

class VerifyBlobsRequest(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class VerifyBlobsResponse(_message.Message):
    __slots__ = ("checked", "quarantined_digests")
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    checked: int
    quarantined_digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, checked: _Optional[int] = ..., quarantined_digests: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStoreStatsResponse(_message.Message):
    __slots__ = ("used_bytes", "blob_count", "quota_bytes", "free_bytes", "pinned_bytes", "image_count")
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOB_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    used_bytes: int
    blob_count: int
    quota_bytes: int
    free_bytes: int
    pinned_bytes: int
    image_count: int
    def __init__(self, used_bytes: _Optional[int] = ..., blob_count: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., pinned_bytes: _Optional[int] = ..., image_count: _Optional[int] = ...) -> None: ...
