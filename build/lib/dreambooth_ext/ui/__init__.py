"""The Dreambooth tab (built from the schema), the job manager behind it, and the HTTP API.

Nothing in this package imports the WebUI: what it needs from a host comes in a `HostAdapter`.
"""

from .adapter import HostAdapter, folder_adapter
from .jobs import JobManager, JobStatus

__all__ = ["HostAdapter", "JobManager", "JobStatus", "folder_adapter"]
