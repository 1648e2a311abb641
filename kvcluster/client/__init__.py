"""The kvcluster client library: :class:`Client` (blocking) and :class:`AsyncClient`."""

from kvcluster.client._core import ReadResult, RingView, WriteResult
from kvcluster.client.aio import AsyncClient, AsyncSession
from kvcluster.client.policies import (
    AllowListPolicy,
    Decision,
    DefaultRetryPolicy,
    FallthroughRetryPolicy,
    LoadBalancingPolicy,
    NodeHealth,
    RetryPolicy,
    RoundRobinPolicy,
    TokenAwarePolicy,
)
from kvcluster.client.sync import Client, Session

__all__ = [
    "AllowListPolicy",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "Decision",
    "DefaultRetryPolicy",
    "FallthroughRetryPolicy",
    "LoadBalancingPolicy",
    "NodeHealth",
    "ReadResult",
    "RetryPolicy",
    "RingView",
    "RoundRobinPolicy",
    "Session",
    "TokenAwarePolicy",
    "WriteResult",
]
