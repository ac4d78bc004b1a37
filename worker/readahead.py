"""Decode ahead: one utterance's audio converted on a thread of its own, a bounded way ahead of
whoever sends it.

Starting a decoder takes about a tenth of a second and a decoder may stall for a moment; a
sender that read the decoder itself would leave that hole in the room. A :class:`ReadAhead`
runs the conversion on its own thread into a bounded buffer (so memory stays at ``ahead`` pieces
whatever the file's length), refilled once half of it has been taken. The microphone sender reads it blocking (:meth:`ReadAhead.frames`);
the pacing loop, which must never block, polls it (:meth:`ReadAhead.poll`) and is called back
(``on_ready``) when a piece it waited for arrives.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("echoq.readahead")

#: how long the reader thread waits for room before it looks at its stop flag again (close()
#: wakes it at once; this is only a backstop)
_PUT_POLL_S = 1.0
#: how long closing a reader waits for its thread (and the decoder under it) to finish
_CLOSE_TIMEOUT_S = 5.0


class ReadAhead:
    """One utterance's pieces, converted on a thread of its own a bounded way ahead of the sender.

    ``open_pieces`` is called on that thread and returns the piece iterator; any error it or
    the iteration raises comes out of :meth:`frames` (or :meth:`poll`) in the sender's thread.
    :meth:`close` stops the thread, which closes the iterator (and so the decoder under it).
    """

    def __init__(self, utterance_id: str, open_pieces: Callable[[], Iterator[Any]], ahead: int,
                 on_ready: Callable[[], None] | None = None, on_end: Callable[[], None] | None = None) -> None:
        self.utterance_id = utterance_id
        self.on_ready = on_ready
        #: called on the reader's thread once the conversion has ended well, while at most
        #: ``ahead`` pieces wait to be sent (the pacing loop starts the next utterance's here)
        self.on_end = on_end
        self._open = open_pieces
        # A full buffer is refilled once half of it has been taken, not a piece at a time: waking
        # the reader thread for every piece sent cost the pacing loop a thread switch per chunk.
        self._items: deque[tuple[str, Any]] = deque()
        self._ahead = max(1, ahead)
        self._low = self._ahead // 2
        self._cond = threading.Condition()
        self._filling_waits = False  # the reader waits for the buffer to be down to _low
        self._taking_waits = False  # frames() waits for a piece
        self._stop = threading.Event()
        self._waited = False  # poll() found nothing: call on_ready with the next piece
        self._thread = threading.Thread(target=self._run, name=f"echoq-read-{utterance_id[:8]}", daemon=True)
        self._thread.start()

    def _put(self, item: tuple[str, Any]) -> bool:
        with self._cond:
            if len(self._items) >= self._ahead:
                self._filling_waits = True
                while len(self._items) > self._low and not self._stop.is_set():
                    self._cond.wait(_PUT_POLL_S)
                self._filling_waits = False
            if self._stop.is_set():
                return False
            self._items.append(item)
            if self._taking_waits:
                self._cond.notify_all()
            waited, self._waited = self._waited, False
        if waited and self.on_ready is not None:
            self.on_ready()
        return True

    def _take(self) -> tuple[str, Any]:
        """The next item; the caller holds the condition and there is one."""
        item = self._items.popleft()
        if self._filling_waits and len(self._items) <= self._low:
            self._cond.notify_all()
        return item

    def _run(self) -> None:
        try:
            stream = self._open()
            try:
                for piece in stream:
                    if not self._put(("frame", piece)):
                        return
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the sender, which raises it as its own
            self._put(("error", exc))
            return
        if self.on_end is not None and not self._stop.is_set():
            try:
                self.on_end()
            except Exception:
                log.exception("after reading %s", self.utterance_id)
        self._put(("end", None))

    def frames(self) -> Iterator[Any]:
        """The pieces in order; raises what the conversion raised."""
        while True:
            with self._cond:
                while not self._items:
                    self._taking_waits = True
                    self._cond.wait()
                self._taking_waits = False
                kind, value = self._take()
            if kind == "frame":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def poll(self) -> tuple[str, Any] | None:
        """The next ``("frame", piece)`` or ``("end", None)`` if there is one now, else None (and
        ``on_ready`` is called when one comes); raises what the conversion raised."""
        with self._cond:
            if not self._items:
                self._waited = True
                return None
            kind, value = self._take()
        if kind == "error":
            raise value
        return kind, value

    def close(self) -> None:
        """Stop converting and wait (bounded) for the thread to let go of the decoder."""
        with self._cond:
            self._stop.set()
            self._items.clear()
            self._cond.notify_all()  # a reader waiting for room sees the flag at once
        self._thread.join(_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("audio reader for %s did not stop within %.0fs", self.utterance_id, _CLOSE_TIMEOUT_S)
