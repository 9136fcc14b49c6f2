"""MqiEmail: a Prefect notification block that sends plain-text e-mail over SMTP.

Prefect core has no SMTP notification block. An automation's send-notification
action runs inside the Prefect *server* process, which builds the block from
its type slug (``mqi-email``): the class must be importable there. The package
declares this module as a ``prefect.collections`` entry point (pyproject.toml),
and Prefect imports every such module before it looks a block class up by slug
(``Block.get_block_class_from_key``) and when the server registers block types at
start-up. So a server started from this installation's environment (the embedded
one `mqi up` starts, or `prefect server start` there) sends our e-mail; a server
elsewhere needs this package installed beside it (docs/notifications.md).

Kept light on purpose: every Prefect process that loads a block imports it.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from prefect.blocks.abstract import NotificationBlock, NotificationError
from pydantic import Field, HttpUrl, SecretStr, model_validator

EMAIL_BLOCK_SLUG = "mqi-email"


class MqiEmail(NotificationBlock):
    """Sends each notification as one plain-text e-mail through an SMTP server.

    Examples:
        ```python
        from blocks.notify import MqiEmail

        MqiEmail.load("mqi-notify-physics").notify("body", subject="subject")
        ```
    """

    _block_type_name = "MQI Email"
    _block_type_slug = EMAIL_BLOCK_SLUG
    _logo_url = HttpUrl("https://images.ctfassets.net/gm98wzqotmnx/4CxjycqILlT9S9YchI7o1q/ee62e2089dfceb19072245c62f0c69d2/image11.png")
    _description = (
        "Plain-text e-mail over SMTP (STARTTLS, implicit TLS or none), for MQI "
        "Communicator's notification automations. `mqi up` / `mqi deploy` save one per "
        "smtp target of the notifications section; the password comes from the "
        "environment variable the configuration names.")

    smtp_host: str = Field(..., description="The SMTP server's host name or address.")
    smtp_port: int = Field(
        default=587, ge=1, le=65535,
        description="Its port: 587 (submission, STARTTLS), 465 (implicit TLS) or 25.")
    from_address: str = Field(..., description="The sender address (the From header).")
    to_addresses: list[str] = Field(
        ..., min_length=1, description="The recipients, one e-mail to all of them.")
    username: str | None = Field(
        default=None, description="Login name; null: the server takes mail unauthenticated.")
    password: SecretStr | None = Field(default=None, description="Login password.")
    starttls: bool = Field(
        default=True, description="Upgrade the connection with STARTTLS before logging in "
        "(the server's certificate is verified).")
    ssl: bool = Field(
        default=False, description="Implicit TLS from the first byte (port 465) instead "
        "of STARTTLS.")
    timeout_seconds: float = Field(
        default=30.0, gt=0, description="Connect and send timeout.")

    @model_validator(mode="after")
    def _one_tls_mode(self) -> MqiEmail:
        if self.ssl and self.starttls:
            raise ValueError("ssl (implicit TLS) and starttls exclude each other")
        return self

    def message(self, body: str, subject: str | None = None) -> EmailMessage:
        """The e-mail ``notify`` sends."""
        msg = EmailMessage()
        msg["From"] = self.from_address
        msg["To"] = ", ".join(self.to_addresses)
        # A subject rendered from a template may span lines; a header must not.
        msg["Subject"] = " ".join((subject or "MQI Communicator").split())
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=self.from_address.rpartition("@")[2] or None)
        msg.set_content(body)
        return msg

    def send(self, body: str, subject: str | None = None) -> None:
        """Send one e-mail now, blocking.

        Raises:
            OSError: The server could not be reached (smtplib.SMTPException included).
        """
        msg = self.message(body, subject)
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.ssl:
            smtp = smtplib.SMTP_SSL(self.smtp_host, self.smtp_port,
                                    timeout=self.timeout_seconds, context=context)
        else:
            smtp = smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=self.timeout_seconds)
        with smtp:
            if self.starttls:
                smtp.starttls(context=context)
            if self.username:
                smtp.login(self.username,
                           self.password.get_secret_value() if self.password else "")
            smtp.send_message(msg)

    async def notify(self, body: str, subject: str | None = None) -> None:
        """Send the notification (the server's send-notification action awaits this).

        A failure is logged, or raised as ``NotificationError`` under
        ``raise_on_failure`` (as the automation's action runs it, so that the
        automation records the failure).
        """
        try:
            # smtplib blocks: never on the server's event loop.
            await asyncio.to_thread(self.send, body, subject)
        except (OSError, smtplib.SMTPException) as exc:
            where = f"{self.smtp_host}:{self.smtp_port}"
            if self._raise_on_failure:
                raise NotificationError(log=f"SMTP to {where} failed: {exc}") from exc
            self.logger.error("e-mail notification through %s failed: %s", where, exc)
