"""The database session of one request, from the engine that the app factory made."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session


def session(request: Request) -> Iterator[Session]:
    """A read-only unit of work: nothing is committed, and closing it returns the connection."""
    s: Session = request.app.state.sessions()
    try:
        yield s
    finally:
        s.close()


DbSession = Annotated[Session, Depends(session)]
