"""The transport-free core of the training server.

Front ends (``trainer_server.frontends``: the gRPC servicer, the Tinker HTTP front end)
decode their wire formats into the domain types of :mod:`~trainer_server.core.types`, call
:class:`~trainer_server.core.service.TrainingCore`, and translate its
:class:`~trainer_server.core.errors.ServiceError` into their own statuses. Nothing in this
package imports protobuf, gRPC or HTTP code.

Modules:
    errors: ``ErrorCode`` and ``ServiceError``.
    types: what calls take and return.
    sessions: sessions and the sequencer that runs each session's calls in order.
    ops: the operations every rank runs, and the explicit table of their handlers.
    held: a custom-loss call between its forward and its gradient.
    restarts: sessions saved at a graceful stop and restored at the next start.
    service: ``TrainingCore``, the domain API over all of them.
"""
