"""Dependencies the routes declare: settings, a database session, the artifact store, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import get_engine
from service.storage import ArtifactStore


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """A session for one request; whatever it did not commit is rolled back when it closes."""
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    """The artifact store the app was created with."""
    store: ArtifactStore = request.app.state.store
    return store


def current_owner() -> str | None:
    """Who is calling; None until API keys exist, which means every record is visible."""
    return None


SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
CurrentOwner = Annotated[str | None, Depends(current_owner)]
