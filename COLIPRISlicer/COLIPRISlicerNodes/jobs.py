"""One panel action at a time, newest request wins, never nested waits. No Qt here.

While an action waits for the worker, Slicer keeps processing events, so the user can
click again (another finding, another snippet). Running that click's action inside the
wait would nest a second wait whose result lands first and is then overwritten by the
older one. Instead the click is remembered, and when the running action returns the
newest remembered one runs (older ones are dropped).
"""

from __future__ import annotations

from collections.abc import Callable


class JobQueue:
    """Runs requested actions one after the other on the calling (GUI) thread.

    Example:
        >>> jobs, shown = JobQueue(), []
        >>> jobs.request(lambda: shown.append("A"))
        >>> shown
        ['A']
    """

    def __init__(self) -> None:
        self.running = False
        self._pending: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(running={self.running}, pending={self._pending is not None})"

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def request(self, action: Callable[[], None]) -> None:
        """Run ``action`` now, or, while another runs, after it (replacing an earlier waiting one).

        An exception of an action drops any waiting action and propagates.
        """
        self._pending = action
        if self.running:
            return
        self.running = True
        try:
            while self._pending is not None:
                action, self._pending = self._pending, None
                action()
        except BaseException:
            self._pending = None
            raise
        finally:
            self.running = False

    def clear(self) -> None:
        """Forget the waiting action (scene closed, module cleaned up)."""
        self._pending = None
