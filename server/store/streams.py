"""Names for a process's own stream of writes, so that writers sharing a store never write the same key."""

import os
import socket


def stream_id() -> str:
    """HOST-PID-RANDOM for this process; the random part tells apart a restarted process that got the same pid."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
