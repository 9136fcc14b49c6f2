"""PublishedConfig: the validated configuration, kept on the Prefect server.

Flow runs on any machine load it by name instead of reading a YAML file that
only the machine running `mqi up` has. It holds no secrets: the configuration
names the environment variables that hold them, and the host block carries
them as SecretStr.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field, HttpUrl


class PublishedConfig(Block):
    """The MQI Communicator configuration as `mqi up` / `mqi deploy` validated it."""

    _block_type_name = "MQI Configuration"
    _block_type_slug = "mqi-configuration"
    _logo_url = HttpUrl("https://images.ctfassets.net/gm98wzqotmnx/4CxjycqILlT9S9YchI7o1q/ee62e2089dfceb19072245c62f0c69d2/image11.png")
    _description = (
        "The whole MQI Communicator configuration (sections as in config.default.yaml), "
        "published from the YAML by `mqi up` or `mqi deploy` and loaded by every flow run. "
        "Edits take effect on the next run; the next `mqi up` publishes the YAML again."
    )

    settings: dict[str, Any] = Field(
        ..., description="The configuration, section by section, validated again on load.")
    source: str = Field(default="", description="The YAML file it was published from.")
