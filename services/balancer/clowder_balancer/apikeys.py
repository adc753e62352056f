"""User API keys: minted and revoked through ApiKeyService (admin token), stored hashed in etcd, checked per request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Protocol

import grpc

from clowder.balancer.v1 import apikeys_pb2, apikeys_pb2_grpc
from clowder_common.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unauthenticated,
                                   Unavailable)
from clowder_common.etcd import EtcdState, PrefixCache
from clowder_common.keys import validate_name

APIKEYS = "apikeys/"
KEY_PREFIX = "ck-"
# "ck-<12 hex id>-<43 url-safe base64 chars of a 32-byte secret>": the id finds the record, the secret proves it.
_KEY_RE = re.compile(r"^ck-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")
_ID_RE = re.compile(r"^[0-9a-f]{12}$")
MAX_PAGE = 1000
MAX_DESCRIPTION = 200
MAX_GROUPS = 64

class TenantAdmin(Protocol):
    """Usage and group limits (tenancy/), for ApiKeyService."""

    async def usage(self, request: apikeys_pb2.GetUsageRequest) -> apikeys_pb2.GetUsageResponse: ...

    async def set_group_limits(self, group: str, limits: apikeys_pb2.KeyLimits) -> apikeys_pb2.GroupLimits: ...

    async def list_group_limits(self) -> list[apikeys_pb2.GroupLimits]: ...


SERVICE_NAME = apikeys_pb2.DESCRIPTOR.services_by_name["ApiKeyService"].full_name


@dataclass(frozen=True)
class Limits:
    """A key's cluster-wide limits (0: none) and priority class, as plain values (the hot path reads them)."""

    rpm: int = 0
    tpm: int = 0
    budget_tokens: int = 0
    budget_period: int = apikeys_pb2.BUDGET_PERIOD_DAY
    # PRIORITY_CLASS_UNSPECIFIED: the key's groups' class, else standard.
    priority: int = apikeys_pb2.PRIORITY_CLASS_UNSPECIFIED

    @classmethod
    def of(cls, limits: apikeys_pb2.KeyLimits) -> "Limits":
        return cls(limits.requests_per_minute, limits.tokens_per_minute, limits.budget_tokens,
                   limits.budget_period or apikeys_pb2.BUDGET_PERIOD_DAY, limits.priority)

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.budget_tokens)


NO_LIMITS = Limits()


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a key id and its groups; the anonymous caller has neither."""

    key_id: str = ""
    groups: frozenset[str] = frozenset()
    limits: Limits = NO_LIMITS

    @property
    def anonymous(self) -> bool:
        return not self.key_id


ANONYMOUS = Principal()


def hash_secret(secret: str) -> str:
    # A plain sha256 is enough: the secret is 256 random bits, not a password to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(key: str) -> tuple[str, str] | None:
    match = _KEY_RE.match(key)
    return (match.group(1), match.group(2)) if match else None


def bearer(value: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` value ("" if absent or another scheme)."""
    scheme, _, token = (value or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def check_admin(expected: bytes | None, authorization: str | None, unusable: str = "") -> None:
    """The admin token check of ApiKeyService and of the gateway's own routes, with the same answers:
    FAILED_PRECONDITION without an admin token (`unusable`: what cannot be done then), else UNAUTHENTICATED
    for a missing or wrong bearer token."""
    if expected is None:
        raise FailedPrecondition("this balancer runs without an admin token" + (f": {unusable}" if unusable else ""),
                                 reason="NO_ADMIN_TOKEN")
    token = bearer(authorization)
    if not token:
        raise Unauthenticated("missing bearer token: send 'authorization: Bearer <admin token>'")
    if not hmac.compare_digest(token.encode(), expected):
        raise Unauthenticated("invalid bearer token", reason="INVALID_TOKEN")


def validate_limits(limits: apikeys_pb2.KeyLimits, field: str = "limits") -> None:
    if limits.budget_period not in apikeys_pb2.BudgetPeriod.values():
        raise InvalidArgument("budget_period must be DAY or MONTH", field=f"{field}.budget_period")
    if limits.priority not in apikeys_pb2.PriorityClass.values():
        raise InvalidArgument("priority must be CRITICAL, STANDARD or SHEDDABLE", field=f"{field}.priority")


def _validate_groups(groups: list[str]) -> None:
    if len(groups) > MAX_GROUPS:
        raise InvalidArgument(f"a key takes at most {MAX_GROUPS} groups", field="groups")
    for i, group in enumerate(groups):
        validate_name(group, f"groups[{i}]")


def _validate_id(key_id: str) -> str:
    if not _ID_RE.match(key_id or ""):
        raise InvalidArgument(f"id {key_id!r} is not an API key id (12 hex digits)", field="id")
    return key_id


class ApiKeyStore:
    """apikeys/<id> in etcd, plus a watched copy for per-request lookups without a round trip."""

    def __init__(self, state: EtcdState) -> None:
        self._state = state
        self._prefix = state.key(APIKEYS)
        self.cache = PrefixCache(state, self._prefix, apikeys_pb2.StoredApiKey)

    async def start(self) -> None:
        await self.cache.start()

    async def stop(self) -> None:
        await self.cache.stop()

    async def create(self, description: str, groups: list[str],
                     limits: apikeys_pb2.KeyLimits | None = None) -> tuple[apikeys_pb2.ApiKey, str]:
        if len(description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"description takes at most {MAX_DESCRIPTION} characters", field="description")
        _validate_groups(groups)
        if limits is not None:
            validate_limits(limits)
        key_id = secrets.token_hex(6)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        api_key = apikeys_pb2.ApiKey(id=key_id, description=description, groups=sorted(set(groups)), limits=limits)
        api_key.create_time.GetCurrentTime()
        stored = apikeys_pb2.StoredApiKey(api_key=api_key, secret_sha256=hash_secret(secret))
        try:
            await self._state.create(self._prefix + key_id, stored)
        except AlreadyExists:
            # 48 random bits collide about never; say so plainly rather than overwrite someone's key.
            raise AlreadyExists("generated key id collided; try again") from None
        return api_key, f"{KEY_PREFIX}{key_id}-{secret}"

    async def get(self, key_id: str) -> apikeys_pb2.ApiKey:
        found = await self._state.get(self._prefix + _validate_id(key_id), apikeys_pb2.StoredApiKey)
        if found is None:
            raise NotFound(f"API key '{key_id}' does not exist", reason="API_KEY_NOT_FOUND", metadata={"id": key_id})
        return found.value.api_key

    async def update(self, request: apikeys_pb2.UpdateApiKeyRequest) -> apikeys_pb2.ApiKey:
        """Apply the masked fields of `request` (all when the mask is empty), compare-and-swap on the record."""
        key = self._prefix + _validate_id(request.id)
        mask = list(request.update_mask) or ["description", "groups", "limits"]
        for path in mask:
            head, _, tail = path.partition(".")
            if head not in ("description", "groups", "limits") or (
                    tail and (head != "limits" or tail not in apikeys_pb2.KeyLimits.DESCRIPTOR.fields_by_name)):
                raise InvalidArgument(f"update_mask: {path!r} is not a field that can be changed", field="update_mask")
        if "description" in mask and len(request.description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"description takes at most {MAX_DESCRIPTION} characters", field="description")
        if "groups" in mask:
            _validate_groups(list(request.groups))
        validate_limits(request.limits)
        while True:
            found = await self._state.get(key, apikeys_pb2.StoredApiKey)
            if found is None:
                raise NotFound(f"API key '{request.id}' does not exist", reason="API_KEY_NOT_FOUND",
                               metadata={"id": request.id})
            stored = found.value
            api_key = stored.api_key
            for path in mask:
                head, _, tail = path.partition(".")
                if head == "description":
                    api_key.description = request.description
                elif head == "groups":
                    del api_key.groups[:]
                    api_key.groups.extend(sorted(set(request.groups)))
                elif tail:
                    setattr(api_key.limits, tail, getattr(request.limits, tail))
                else:
                    api_key.limits.CopyFrom(request.limits)
            if await self._state.update(key, stored, found.mod_revision):
                return api_key
            # Another admin changed the key meanwhile: apply our fields to theirs.

    async def list(self, page_size: int, page_token: str) -> tuple[list[apikeys_pb2.ApiKey], str]:
        if page_token and not _ID_RE.match(page_token):
            raise InvalidArgument("page_token is not one this server issued", field="page_token")
        size = min(page_size or MAX_PAGE, MAX_PAGE)
        items, _ = await self._state.list(self._prefix, apikeys_pb2.StoredApiKey)
        keys = [i.value.api_key for i in items if i.value.api_key.id > page_token]
        page = keys[:size]
        return page, (page[-1].id if len(keys) > size else "")

    async def delete(self, key_id: str) -> None:
        if not await self._state.delete(self._prefix + _validate_id(key_id)):
            raise NotFound(f"API key '{key_id}' does not exist", reason="API_KEY_NOT_FOUND", metadata={"id": key_id})
        # Its limit counters (tenancy/quota.py) go too; its usage records stay, for charging back.
        await self._state.delete(self._state.key("quota", key_id))

    def authenticate(self, token: str, required: bool) -> Principal:
        """The principal a bearer token stands for.

        A token in our key format must be valid, required or not (a revoked key must never quietly
        become anonymous). Other tokens (SDKs insist on sending one) count as anonymous unless keys
        are required.
        """
        parsed = parse_key(token)
        if parsed is None:
            if required:
                raise Unauthenticated(
                    "an API key is required: send 'Authorization: Bearer <key>'", reason="API_KEY_REQUIRED"
                )
            return ANONYMOUS
        key_id, secret = parsed
        if not self.cache.ready:
            # An unloaded cache is not a revoked key: 503 (retry), never a false 401.
            raise Unavailable("API keys are not loaded yet", retry_after=1.0)
        stored = self.cache.items.get(self._prefix + key_id)
        # compare_digest on the hashes: timing says nothing about how much of the secret matched.
        if stored is None or not hmac.compare_digest(stored.secret_sha256, hash_secret(secret)):
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        return Principal(key_id, frozenset(stored.api_key.groups), Limits.of(stored.api_key.limits))


class ApiKeyServicer(apikeys_pb2_grpc.ApiKeyServiceServicer):
    """ApiKeyService; every method checks the admin token itself, because the inference service on the
    same server must stay callable with user keys (the server-wide admin token would lock users out)."""

    def __init__(self, store: ApiKeyStore, admin_token: str | None, tenants: TenantAdmin | None = None) -> None:
        self._store = store
        self._tenants = tenants
        self._token = admin_token.encode() if admin_token else None

    def register(self, server: grpc.aio.Server) -> str:
        apikeys_pb2_grpc.add_ApiKeyServiceServicer_to_server(self, server)
        return SERVICE_NAME

    def _check_admin(self, context: grpc.aio.ServicerContext) -> None:
        presented = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        check_admin(self._token, presented if isinstance(presented, str) else presented.decode(errors="replace"),
                    "API keys cannot be managed")

    async def CreateApiKey(self, request, context) -> apikeys_pb2.CreateApiKeyResponse:
        self._check_admin(context)
        api_key, key = await self._store.create(request.description, list(request.groups),
                                                request.limits if request.HasField("limits") else None)
        return apikeys_pb2.CreateApiKeyResponse(api_key=api_key, key=key)

    async def GetApiKey(self, request, context) -> apikeys_pb2.GetApiKeyResponse:
        self._check_admin(context)
        return apikeys_pb2.GetApiKeyResponse(api_key=await self._store.get(request.id))

    async def ListApiKeys(self, request, context) -> apikeys_pb2.ListApiKeysResponse:
        self._check_admin(context)
        page, token = await self._store.list(request.page_size, request.page_token)
        return apikeys_pb2.ListApiKeysResponse(api_keys=page, next_page_token=token)

    async def UpdateApiKey(self, request, context) -> apikeys_pb2.UpdateApiKeyResponse:
        self._check_admin(context)
        return apikeys_pb2.UpdateApiKeyResponse(api_key=await self._store.update(request))

    def _tenancy(self) -> TenantAdmin:
        if self._tenants is None:
            raise FailedPrecondition("this balancer runs without usage metering and group limits",
                                     reason="NO_TENANCY")
        return self._tenants

    async def GetUsage(self, request, context) -> apikeys_pb2.GetUsageResponse:
        self._check_admin(context)
        return await self._tenancy().usage(request)

    async def SetGroupLimits(self, request, context) -> apikeys_pb2.SetGroupLimitsResponse:
        self._check_admin(context)
        return apikeys_pb2.SetGroupLimitsResponse(
            group_limits=await self._tenancy().set_group_limits(request.group, request.limits))

    async def ListGroupLimits(self, request, context) -> apikeys_pb2.ListGroupLimitsResponse:
        self._check_admin(context)
        return apikeys_pb2.ListGroupLimitsResponse(group_limits=await self._tenancy().list_group_limits())

    async def DeleteApiKey(self, request, context) -> apikeys_pb2.DeleteApiKeyResponse:
        self._check_admin(context)
        await self._store.delete(request.id)
        return apikeys_pb2.DeleteApiKeyResponse()
