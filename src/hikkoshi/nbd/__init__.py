"""The NBD data plane: a pure protocol codec, an asyncio server and client."""
