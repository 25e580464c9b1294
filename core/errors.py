"""Domain errors of the scheduling layer: what went wrong, in words, never as an HTTP status.

The HTTP edge (gateway/errors.py) maps each class to one status; the CLI or a library caller can catch them
without knowing HTTP.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a request could not be served, with a message that says what to change."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InputRejected(DomainError, ValueError):
    """A request breaks a rule or a limit of the service; `param` names the field, `code` the rule."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class InvalidInput(InputRejected):
    """A request value is malformed or out of its range (an empty list, a count below 1)."""


class InputTooLarge(InputRejected):
    """A request is over a configured size limit (documents, characters): send less, or split it."""


class Overloaded(DomainError):
    """The queue holds as much work as it may; the same request may succeed after `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(DomainError):
    """The request's deadline passed before all of its prompts were scored."""


class ShuttingDown(DomainError):
    """The scheduler is draining or closed and takes no new work; retry on another replica."""


__all__ = [
    "DeadlineExceeded",
    "DomainError",
    "InputRejected",
    "InputTooLarge",
    "InvalidInput",
    "Overloaded",
    "ShuttingDown",
]
