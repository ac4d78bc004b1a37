"""The error tree. Permanent errors fail one utterance (or one request) and are never retried;
retryable errors are retried inside the sender with backoff.

    EchoqError
    ├── PermanentError              never retried
    │   ├── InvalidInput            bad input from a producer (empty text, bad sample rate, ...)
    │   │   ├── TextTooLong         text echo that cannot fit one message
    │   │   └── UnsafeURL           a URL echoq refuses to fetch (internal address, bad redirect)
    │   ├── UnknownConversation     no open conversation with that id
    │   ├── AudioError              unreadable, empty or oversized audio
    │   ├── MessageTooLarge         a wire message over the size limit (a settings mistake)
    │   └── ConfigError             settings that cannot work
    └── RetryableError              retried with backoff
        ├── SendFailed              one app message was not sent
        │   └── RateLimited         the room refused for rate
        ├── RoomDisconnected        the room connection is gone; rejoin, then resume
        ├── JoinFailed              joining the room failed or timed out
        ├── ReplicaAbsent           the replica has not joined the room in time
        └── BackendUnavailable      Redis (the broker and the store) cannot be reached
"""

from __future__ import annotations


class EchoqError(Exception):
    """Root of every error echoq raises on purpose."""


class PermanentError(EchoqError):
    """Retrying cannot help."""


class InvalidInput(PermanentError):
    """A producer's input is wrong; the message says which field and why."""


class TextTooLong(InvalidInput):
    """A text echo does not fit one app message."""


class UnsafeURL(InvalidInput):
    """A URL that resolves or redirects to an address echoq does not fetch from."""


class UnknownConversation(PermanentError):
    """No open conversation with that id."""


class AudioError(PermanentError):
    """Audio that cannot be decoded, has no samples, or is over the limits."""


class MessageTooLarge(PermanentError):
    """A wire message over ``max_message_bytes``."""


class ConfigError(PermanentError):
    """Settings that cannot work together."""


class RetryableError(EchoqError):
    """Transient: try again after a pause."""


class SendFailed(RetryableError):
    """One app message was not sent."""


class RateLimited(SendFailed):
    """The room refused the message for its rate."""


class RoomDisconnected(RetryableError):
    """The room connection is gone; rejoin and resume from the cursor."""


class JoinFailed(RetryableError):
    """Joining the room failed or did not finish in time."""


class ReplicaAbsent(RetryableError):
    """The replica participant did not appear in the room in time."""


class BackendUnavailable(RetryableError):
    """Redis, which holds the queues and the conversation logs, cannot be reached."""


class LeaseLost(EchoqError):
    """Another worker owns the conversation now; stop at once."""


class Interrupted(Exception):  # noqa: N818 - what happened, caught to stop an utterance
    """The conversation was interrupted while an utterance was being sent."""


class Stopping(Exception):  # noqa: N818 - what is happening, caught at a message boundary
    """The worker is letting the conversation go: stop at this message boundary."""
