"""The sidecar data plane: HTTP/1.1 listeners on asyncio.Protocol + httptools, upstream pools, recording."""
