"""Pull progress as a terminal progress bar: bytes, rate and ETA."""

from __future__ import annotations

from typing import Iterable

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from clowder.controller.v1 import controller_pb2
from clowder.storage.v1 import storage_pb2


def show_pull(alias: str, stream: Iterable[controller_pb2.PullImageResponse],
              console: Console) -> storage_pb2.Blob | None:
    """Render the controller's pull stream; returns the stored blob."""
    blob = None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    # Without a terminal (CI, pipes) rich prints nothing until the end; the final line still appears.
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"pull {alias}", total=None)
        for message in stream:
            progress = message.progress
            bar.update(task, description=f"pull {alias} -> {message.node}", completed=progress.bytes_done,
                       total=progress.bytes_total or None)
            if message.HasField("blob"):
                blob = message.blob
                bar.update(task, completed=blob.size_bytes, total=blob.size_bytes)
    return blob
