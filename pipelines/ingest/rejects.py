"""The one shape of a cleaning refusal: a report `reason` key and a human `detail`."""

from __future__ import annotations


class Reject(ValueError):
    """An input that cannot be kept; `reason` is its key in the data-quality report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
