"""The one Host interface both hosts satisfy.

That RemoteHost and LocalHost satisfy ``Host`` statically is checked by mypy
(``blocks.factory.host_from_settings`` returns either as a ``Host``); here the
runtime-checkable protocol is asked too.
"""

from __future__ import annotations

import pytest

from blocks import Host, LocalHost, RemoteHost
from blocks.factory import Host as FactoryHost
from blocks.host import RunSpec


def test_both_hosts_satisfy_the_host_protocol():
    remote = RemoteHost(hostname="gpu.example", username="mqi")
    local = LocalHost()
    assert isinstance(remote, Host) and isinstance(local, Host)
    assert not isinstance(object(), Host)
    assert FactoryHost is Host  # flows import it from blocks.factory


def test_run_options_default_like_the_documented_signature():
    spec = RunSpec("true")
    assert (spec.timeout, spec.env, spec.cwd, spec.check, spec.on_line, spec.stream,
            spec.pid_file) == (None, None, None, True, None, True, None)
    assert RunSpec("true", stream=False, on_line=print).line_callback("h") is None
    assert RunSpec("true", on_line=print).line_callback("h") is print


def test_an_unknown_run_option_is_refused():
    with pytest.raises(TypeError):
        LocalHost().run("true", timout=5)  # type: ignore[call-arg]
