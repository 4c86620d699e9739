"""Messages between the bench and its client processes over a multiprocessing pipe,
read inside an asyncio loop. A message is ``(kind, body)``."""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from typing import Any

Message = tuple[str, dict[str, Any]]
CLOSED: Message = ("closed", {})


class Mailbox:
    """One end of a pipe: send at once, receive through an asyncio queue."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._open = True
        self._loop.add_reader(connection.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.connection.poll():
                self.inbox.put_nowait(self.connection.recv())
        except (EOFError, OSError):
            self.close()
            self.inbox.put_nowait(CLOSED)

    def send(self, kind: str, **body: Any) -> None:
        if self._open:
            try:
                self.connection.send((kind, body))
            except (BrokenPipeError, OSError):
                self.close()

    async def receive(self, *kinds: str) -> Message:
        """The next message of one of ``kinds`` (others are dropped), or CLOSED."""
        while True:
            message = await self.inbox.get()
            if message[0] in kinds or message is CLOSED or message[0] == "closed":
                return message

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self.connection.fileno())
