"""Stand-ins for the clinic's tools: same arguments, log lines, exit codes and files.

Each runs as ``python3 -m demo.simulators.<tool>`` (interpreter, tps_env,
raw2dicom, nvidia_smi) with the Python that has this package, which is why the
demo profile's local host puts that Python first on PATH.
"""
