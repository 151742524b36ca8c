"""HTTP/2 on the h2 library: the downstream codec and its asyncio driver, and the upstream client."""
