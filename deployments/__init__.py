"""How work starts: the embedded Prefect server, serving deployments, the sensor, the CLI.

This layer only composes: it reads the configuration, builds blocks and hands
them to flows.
"""
