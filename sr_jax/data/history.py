"""The user's history aspect: the texts of the items a user clicked before an example, strictly earlier in
time, so that nothing leaks from the future (the way text-based transferable recommenders such as UniSRec
and Recformer represent users: by what they engaged with, not by an id a new dataset does not share).

`user_history` gives each example the text rows of its user's last N clicked items among a set of
events, most recent last, -1 padding. Which events: one definition for training, evaluation and scoring
(`selection.history_events`): the behaviour log (the train split's events in the domains the model was trained
on) plus the scored split's own events in those domains when it is not the log. The history is an input read
from the log, as a deployed model reads it, whatever share of its labels a run trains on.
"""

from __future__ import annotations

import numpy as np

COLUMN = "user.history"
EVENT_KEYS = ("user_id", "timestamp", "item_text", "label")  # what an event of the log holds


def user_history(examples: dict[str, np.ndarray], events: dict[str, np.ndarray], n: int) -> np.ndarray:
    """[E, n] int32: for example e, the text rows of the last `n` items with text that its user clicked in
    `events` at a timestamp strictly before e's (ties are not "before"); -1 where there are fewer."""
    clicked = (np.asarray(events["label"]) == 1) & (np.asarray(events["item_text"]) >= 0)
    user, time, text = (np.asarray(events[k])[clicked] for k in ("user_id", "timestamp", "item_text"))
    ex_user, ex_time = np.asarray(examples["user_id"]), np.asarray(examples["timestamp"])
    ranks = np.unique(np.concatenate([time, ex_time]), return_inverse=True)[1].astype(np.int64)
    span = len(ranks) + 1
    key = user.astype(np.int64) * span + ranks[: len(time)]
    order = np.argsort(key, kind="stable")
    key, user, text = key[order], user[order], text[order]
    before = np.searchsorted(key, ex_user.astype(np.int64) * span + ranks[len(time) :], side="left")
    first = np.searchsorted(user, ex_user, side="left")  # the user's first event
    index = before[:, None] - n + np.arange(n)[None, :]
    valid = index >= first[:, None]
    return np.where(valid, text[np.clip(index, 0, max(len(text) - 1, 0))] if len(text) else -1, -1).astype(np.int32)


def with_history(columns: dict[str, np.ndarray], events: dict[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
    """`columns` (in the dataset's own ids) with the `user.history` column, read from `events`
    (`selection.history_events`); None (a dataset without timestamps): every history empty, the aspect missing."""
    if events is None:
        return {**columns, COLUMN: np.full((len(columns["label"]), n), -1, np.int32)}
    return {**columns, COLUMN: user_history(columns, events, n)}
