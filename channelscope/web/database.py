"""The database session of one request, from the engine that the app factory made."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session


async def session(request: Request) -> AsyncIterator[Session]:
    """A read-only unit of work: nothing is committed, and closing it returns the connection.

    Async only so that FastAPI opens and closes it on the event loop rather than in a worker
    thread: making a Session does no I/O, and a route that runs in a thread may still use it."""
    s: Session = request.app.state.sessions()
    try:
        yield s
    finally:
        s.close()


DbSession = Annotated[Session, Depends(session)]
