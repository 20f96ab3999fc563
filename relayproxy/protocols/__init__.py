"""Sans-I/O login watchers: bytes in, actions out. Nothing here imports Twisted."""
