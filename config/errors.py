"""The root of every error MQI Communicator raises on purpose.

Each layer (config, blocks, flows, deployments) derives its errors from
``MqiError``, so the CLI maps them to exit codes in one place and anything that
is *not* an ``MqiError`` is, by definition, a bug worth a traceback.

It lives in ``config`` because that is the bottom of the layering
(config → blocks → flows → deployments): every layer may import it.
"""

from __future__ import annotations


class MqiError(Exception):
    """An expected failure with a message a clinical user can act on.

    Attributes:
        exit_status: The ``mqi`` command's exit status when this error ends it.
    """

    exit_status: int = 1

    def __init__(self, *args: object) -> None:
        # Every message passes the one redaction point as it is made: it may reach
        # a state message, an event, the database or the terminal from here.
        from config.redaction import redact

        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))
