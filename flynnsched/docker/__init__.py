"""
The Docker engine client: one interface (``IDockerEngine``), the treq implementation and its parsers.
"""

from flynnsched.docker.interface import (
    LABEL_JOB_ID,
    LABEL_JOB_TYPE,
    LABEL_MANAGED,
    LABEL_OWNER,
    Conflict,
    ContainerSpec,
    ContainerState,
    ContainerSummary,
    EngineError,
    EngineUnavailable,
    Event,
    IAttachment,
    IDockerEngine,
    IEventSubscription,
    ImageNotFound,
    NoSuchContainer,
)

__all__ = [
    "LABEL_JOB_ID",
    "LABEL_JOB_TYPE",
    "LABEL_MANAGED",
    "LABEL_OWNER",
    "Conflict",
    "ContainerSpec",
    "ContainerState",
    "ContainerSummary",
    "EngineError",
    "EngineUnavailable",
    "Event",
    "IAttachment",
    "IDockerEngine",
    "IEventSubscription",
    "ImageNotFound",
    "NoSuchContainer",
]
