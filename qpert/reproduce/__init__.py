"""``qpert reproduce``: the paper's protocols end to end, measured beside the published numbers."""

from .protocols import PROTOCOLS, Protocol, Run, get_protocol, register_protocol
from .published import Published, PublishedRow, published
from .runner import Reproduction, RunResult, reproduce, write_outputs

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "Published",
    "PublishedRow",
    "Reproduction",
    "Run",
    "RunResult",
    "get_protocol",
    "published",
    "register_protocol",
    "reproduce",
    "write_outputs",
]
