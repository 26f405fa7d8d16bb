"""Errors that come from the user's input, not from a bug: the command line prints them
as one line (no traceback) and exits with 2.  Each is a ValueError, so code that caught
ValueError before still does."""

from __future__ import annotations


class UserError(ValueError):
    """A config, data set or run directory that cannot be used as given."""


class DataError(UserError):
    """A data set that cannot be read or split as asked (files, partition)."""


class CheckpointError(UserError):
    """No checkpoint of a run directory can be resumed from."""


class RoundError(RuntimeError):
    """A round that could not complete (e.g. no client sent a usable update: the run
    diverged).  The last checkpoint holds the model of the round before."""


class ClientFault(RuntimeError):
    """A client failing the way clients of a federation fail: an injected failure of a
    fault model, a node's error reply, a timeout, a malformed reply, a diverged model.
    The engine drops that client from the round and goes on; any other exception raised
    while a client trains in process is a bug and ends the run (with the client id and
    the round)."""


class NonFiniteModel(ClientFault):
    """Local training left NaN or inf in the client's model (it diverged): there is no
    update to select a top-k from or to send; dropped like a non-finite reply."""
