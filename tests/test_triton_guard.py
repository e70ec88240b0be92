"""The nginx guard's configuration (flannel.handlers.triton_guard): what it lets reach Triton.

The guard running in front of a real Triton is tested in tests/test_triton_serving.py.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flannel.handlers.triton_guard import (BODY_LIMIT, HEADER_DIGITS, JSON_BODY_LIMIT,
                                           guard_config)


def test_json_bodies_have_their_own_lower_limit_and_every_refusal_names_its_status(tmp_path):
    conf = guard_config(("127.0.0.1", 8080), ("127.0.0.1", 18000), tmp_path)
    assert f"client_max_body_size {BODY_LIMIT};" in conf
    assert f"client_max_body_size {JSON_BODY_LIMIT};" in conf
    assert JSON_BODY_LIMIT < 4 * 10**6 < BODY_LIMIT  # under the body size Triton 2.51 dies on
    assert "listen 127.0.0.1:8080;" in conf and "server 127.0.0.1:18000;" in conf
    assert f'"~^[0-9]{{1,{HEADER_DIGITS}}}$" 1;' in conf
    assert conf.count("internal;") == 1  # the JSON location is not reachable from outside
    for line in conf.splitlines():
        if "return 413" in line:
            assert "'{\"error\":\"413: " in line, line


def test_ipv6_addresses_are_bracketed(tmp_path):
    assert "listen [::1]:8080;" in guard_config(("::1", 8080), ("127.0.0.1", 1), tmp_path)


@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").is_file(),
                    reason="nginx is not installed")
def test_nginx_accepts_the_configuration(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = tmp_path / "nginx.conf"
    conf.write_text(guard_config(("127.0.0.1", 8080), ("127.0.0.1", 18000), tmp_path))
    result = subprocess.run([nginx, "-t", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path),
                             "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
