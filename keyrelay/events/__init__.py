"""Delivery events from Postfix's log (docs/events.md).

- ``maillog``: one log line as a typed record;
- ``correlate``: records tied by queue id into ``processed``, ``delivered``, ``deferred``,
  ``bounce`` and ``dropped`` events of keyrelay's logins;
- ``store``: the SQLite file of the outbox, the log position and the correlation state,
  written in one transaction per batch;
- ``follow``: the maillog file followed from its checkpoint, across rotations.

``python -m keyrelay.events --maillog FILE --state FILE --once`` runs them over a file.
"""
