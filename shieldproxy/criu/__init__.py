"""CRIU support: find the CRIU binary, read and rewrite its image folders."""

from shieldproxy.criu.images import (
    ImageError,
    ImageFlow,
    read_tcp_flows,
    restore_backup,
    rewrite_tcp_flow,
    to_snapshot,
)
from shieldproxy.criu.locate import CriuNotFoundError, find_criu

__all__ = [
    "CriuNotFoundError",
    "ImageError",
    "ImageFlow",
    "find_criu",
    "read_tcp_flows",
    "restore_backup",
    "rewrite_tcp_flow",
    "to_snapshot",
]
