"""The state machine of one Analyze click, shown by the panel's button, progress bar and
status line. No Qt here: the Widget renders a ``RunState``.

    idle -> installing -> downloading -> loading -> encoding -> scoring -> importing -> idle
    any busy state -> cancelling -> idle ("Cancelled; nothing was added")
    any state -> error
"""

from __future__ import annotations

from dataclasses import dataclass

STATES = ("idle", "installing", "downloading", "loading", "encoding", "scoring", "importing", "cancelling", "error")
#: Progress bar value (percent) in each state.
PROGRESS = {"idle": 0, "installing": 5, "downloading": 10, "loading": 25, "encoding": 45, "scoring": 75,
            "importing": 95, "cancelling": 0, "error": 0}
#: Status line text of each state (the Widget translates it).
TEXTS = {"idle": "Ready.", "installing": "Checking dependencies", "downloading": "Downloading weights",
         "loading": "Loading model", "encoding": "Encoding the volume", "scoring": "Scoring findings",
         "importing": "Importing results", "cancelling": "Cancelling", "error": "Error:"}
#: Engine status line prefix -> the state it starts (see ``Engine``/``Analyzer`` notify calls).
STATUS_PREFIXES = {"Downloading": "downloading", "Loading": "loading", "Preprocessing": "encoding",
                   "Encoding": "encoding", "Scoring": "scoring", "Importing": "importing"}


@dataclass
class RunState:
    """Where the run is (``state``) and the latest status line that is not a step (``detail``)."""

    state: str = "idle"
    detail: str = ""

    @property
    def busy(self) -> bool:
        """True while a run is in progress (the Analyze button is then a Cancel button)."""
        return self.state not in ("idle", "error")

    @property
    def progress(self) -> int:
        return PROGRESS[self.state]

    def set(self, state: str, detail: str = "") -> None:
        if state not in STATES:
            raise ValueError(f'Unknown run state "{state}"; expected one of {STATES}.')
        self.state, self.detail = state, detail

    def on_status(self, message: str, cancel_requested: bool = False) -> None:
        """Follow an engine status line; other lines (e.g. warnings) become the detail."""
        if cancel_requested:
            self.set("cancelling")
            return
        state = next((s for prefix, s in STATUS_PREFIXES.items() if message.startswith(prefix)), None)
        if state is None:
            self.detail = message
        elif state != self.state:
            self.set(state)
