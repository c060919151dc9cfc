"""
Service jobs: long-running containers, supervised and restarted with backoff, stored durably.
"""

from flynnsched.services.http import ServicesResource
from flynnsched.services.policy import State
from flynnsched.services.spec import RestartPolicy, ServiceSpec, SpecError, parse_service_spec
from flynnsched.services.store import MemoryServiceStore, SQLiteServiceStore
from flynnsched.services.supervisor import ServiceSupervisor

__all__ = [
    "MemoryServiceStore",
    "RestartPolicy",
    "SQLiteServiceStore",
    "ServiceSpec",
    "ServiceSupervisor",
    "ServicesResource",
    "SpecError",
    "State",
    "parse_service_spec",
]
