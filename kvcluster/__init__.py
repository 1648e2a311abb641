"""kvcluster: a replicated, highly available key-value database.

from kvcluster import Client
with Client(["127.0.0.1:7101"]) as kv:
    kv.put(b"user:1", b"alice")
    print(kv.get(b"user:1").values)
"""

__version__ = "0.1.0"

from kvcluster import errors
from kvcluster.client import AsyncClient, Client, ReadResult, WriteResult

__all__ = ["AsyncClient", "Client", "ReadResult", "WriteResult", "__version__", "errors"]
