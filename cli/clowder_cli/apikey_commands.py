"""`clowder apikey create|update|group-limits|ls|revoke`: user API keys and their limits, with the admin token."""

from __future__ import annotations

import argparse
import os
import pathlib

from rich.console import Console
from rich.table import Table

from clowder.balancer.v1 import apikeys_pb2
from clowder.client import Client
from clowder_cli import paths
from clowder_common.auth import read_admin_token
from clowder_common.errors import InvalidArgument

CALL_DEADLINE_S = 30


def add_parser(sub: argparse._SubParsersAction) -> None:
    apikey = sub.add_parser("apikey", help="manage user API keys for the OpenAI API")
    apikey.add_argument("--balancer", default=os.environ.get("CLOWDER_BALANCER_GRPC"),
                        help="balancer gRPC address host:port (default: the local cluster's)")
    verbs = apikey.add_subparsers(dest="apikey_command", required=True)
    create = verbs.add_parser("create", help="create a key (its secret is printed once)")
    create.add_argument("--group", action="append", default=[], dest="groups",
                        help="group the key belongs to (repeatable)")
    create.add_argument("--description", default="", help="who or what uses the key")
    _limit_flags(create)
    update = verbs.add_parser("update", help="change a key's description, groups, limits or priority "
                                             "(only the flags given)")
    update.add_argument("id")
    update.add_argument("--group", action="append", default=None, dest="groups",
                        help="group the key belongs to (repeatable; replaces the key's groups)")
    update.add_argument("--description", default=None, help="who or what uses the key")
    _limit_flags(update)
    group = verbs.add_parser("group-limits", help="set a group's limits (all its keys together), or list them all")
    group.add_argument("group", nargs="?", help="the group to set (none: list every group's limits)")
    _limit_flags(group)
    verbs.add_parser("ls", help="list keys (never their secrets)")
    revoke = verbs.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("id")


PERIODS = {"day": apikeys_pb2.BUDGET_PERIOD_DAY, "month": apikeys_pb2.BUDGET_PERIOD_MONTH}
PRIORITIES = {"critical": apikeys_pb2.PRIORITY_CLASS_CRITICAL, "standard": apikeys_pb2.PRIORITY_CLASS_STANDARD,
              "sheddable": apikeys_pb2.PRIORITY_CLASS_SHEDDABLE}
# Flag -> KeyLimits field.
LIMIT_FIELDS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute", "budget_tokens": "budget_tokens",
                "budget_period": "budget_period", "priority": "priority"}


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute, all balancers together (0: none)")
    parser.add_argument("--tpm", type=int, default=None, help="tokens per minute, all balancers together (0: none)")
    parser.add_argument("--budget-tokens", type=int, default=None, help="tokens per budget period (0: none)")
    parser.add_argument("--budget-period", choices=sorted(PERIODS), default=None, help="budget period (default day)")
    parser.add_argument("--priority", choices=list(PRIORITIES), default=None,
                        help="priority class when replicas are saturated (default standard)")


def _limits(args: argparse.Namespace) -> tuple[apikeys_pb2.KeyLimits, list[str]]:
    """The limits the flags give, and the limits.<field> paths they set."""
    limits = apikeys_pb2.KeyLimits()
    paths = []
    for flag, name in LIMIT_FIELDS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "budget_period":
            value = PERIODS[value]
        elif flag == "priority":
            value = PRIORITIES[value]
        elif value < 0:
            raise InvalidArgument(f"--{flag.replace('_', '-')} must not be negative", field=flag)
        setattr(limits, name, value)
        paths.append(f"limits.{name}")
    return limits, paths


def describe_limits(limits: apikeys_pb2.KeyLimits) -> str:
    parts = []
    if limits.requests_per_minute:
        parts.append(f"{limits.requests_per_minute} rpm")
    if limits.tokens_per_minute:
        parts.append(f"{limits.tokens_per_minute} tpm")
    if limits.budget_tokens:
        period = "month" if limits.budget_period == apikeys_pb2.BUDGET_PERIOD_MONTH else "day"
        parts.append(f"{limits.budget_tokens} tokens/{period}")
    return ", ".join(parts) or "-"


def describe_priority(limits: apikeys_pb2.KeyLimits) -> str:
    names = {v: k for k, v in PRIORITIES.items()}
    return names.get(limits.priority, "standard")


def handles(args: argparse.Namespace) -> bool:
    return args.command == "apikey"


def balancer_address(args: argparse.Namespace, data_dir: pathlib.Path) -> str:
    return args.balancer or paths.local_address(data_dir, "balancer_grpc", "--balancer")


def run(args: argparse.Namespace, data_dir: pathlib.Path, console: Console) -> int:
    with Client(balancer=balancer_address(args, data_dir), admin_token=read_admin_token(data_dir),
                timeout_s=CALL_DEADLINE_S) as client:
        if args.apikey_command == "create":
            limits, paths = _limits(args)
            record, secret = client.api_keys.create(args.description, args.groups, limits if paths else None)
            console.print(f"API key {record.id} created; it is shown only now:", highlight=False)
            # Plain print: rich could wrap the key across lines.
            print(secret)
            return 0
        if args.apikey_command == "update":
            limits, paths = _limits(args)
            request = apikeys_pb2.UpdateApiKeyRequest(id=args.id, limits=limits)
            if args.description is not None:
                request.description = args.description
                paths.append("description")
            if args.groups is not None:
                request.groups.extend(args.groups)
                paths.append("groups")
            if not paths:
                raise InvalidArgument("nothing to change: give --description, --group, --rpm, --tpm, "
                                      "--budget-tokens, --budget-period or --priority")
            request.update_mask.extend(paths)
            record = client.api_keys.update(request)
            console.print(f"API key {record.id} updated: {describe_limits(record.limits)}, "
                          f"priority {describe_priority(record.limits)}", highlight=False)
            return 0
        if args.apikey_command == "group-limits":
            limits, paths = _limits(args)
            if args.group:
                if not paths:
                    raise InvalidArgument("give the group's limits: --rpm, --tpm, --budget-tokens, --budget-period,"
                                          " --priority (all 0 removes them)")
                record = client.api_keys.set_group_limits(args.group, limits)
                console.print(f"group {record.group}: {describe_limits(record.limits)}, "
                              f"priority {describe_priority(record.limits)}", highlight=False)
                return 0
            table = Table("GROUP", "LIMITS", "PRIORITY")
            for record in client.api_keys.list_group_limits():
                table.add_row(record.group, describe_limits(record.limits), describe_priority(record.limits))
            console.print(table)
            return 0
        if args.apikey_command == "ls":
            table = Table("ID", "GROUPS", "DESCRIPTION", "LIMITS", "PRIORITY", "CREATED")
            for key in client.api_keys.list():
                created = key.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M") if key.create_time.seconds else ""
                table.add_row(key.id, ",".join(key.groups), key.description, describe_limits(key.limits),
                              describe_priority(key.limits), created)
            console.print(table)
            return 0
        client.api_keys.revoke(args.id)
        console.print(f"API key {args.id} revoked")
        return 0
