"""gRPC options shared by every kvcluster channel and server.

Clients and the node-to-node gRPC transport use the same channel options:
64 MiB messages (large batches and repair exchanges) and a quick reconnect
(100 ms .. 1 s backoff) so a restarted node is used again at once; gRPC's own
retries are off because the kvcluster retry policies decide what is safe to
send twice.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_MESSAGE_SIZES = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

CHANNEL_OPTIONS = [
    *_MESSAGE_SIZES,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]

SERVER_OPTIONS = [
    *_MESSAGE_SIZES,
    ("grpc.so_reuseport", 0),  # a taken port must fail the start, not be shared
]
