"""Build hook: compile the hot path with mypyc (typed Python → C), about 2x less CPU per request.

Also builds four small C extensions: dataplane/io/_direct.c, direct socket writes (see
dataplane/io/writepath.py); dataplane/io/_reads.c, batched socket reads (io/readpath.py);
dataplane/http1/_fields.c, where a head ends and which of its fields the proxy reads
(http1/headers.py); and dataplane/http2/_session.c, HTTP/2 frames over the system's libnghttp2
(http2/engine.py), where its header is installed.

The C extensions use Linux system calls and are built on Linux only; elsewhere reads and
writes go through the transports. The same modules run unchanged as plain Python: set
FAILOVER_PROXY_PURE=1 to skip compiling
(for example where no C compiler is available; reads and writes then go through the
transports); that also removes compiled copies left in a source checkout, so they cannot shadow
edited sources. Everything else is in pyproject.toml.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
NGHTTP2_HEADER = "/usr/include/nghttp2/nghttp2.h"
"""libnghttp2's header (Debian: libnghttp2-dev, which `make` installs): without it HTTP/2
runs on the pure-Python `h2` library instead."""
COMPILED = [
    "failover_proxy/model/balance.py",
    "failover_proxy/model/capacity.py",
    "failover_proxy/model/policy.py",
    "failover_proxy/model/backends.py",
    "failover_proxy/model/topology.py",
    "failover_proxy/model/routing.py",
    "failover_proxy/model/connector.py",
    "failover_proxy/dataplane/streams.py",
    "failover_proxy/dataplane/http1/chunked.py",
    "failover_proxy/dataplane/http1/headers.py",
    "failover_proxy/dataplane/request.py",
    "failover_proxy/dataplane/http1/upstream.py",
    "failover_proxy/dataplane/exchange.py",
    "failover_proxy/dataplane/retries.py",
    "failover_proxy/dataplane/http1/downstream.py",
    "failover_proxy/dataplane/http2/fields.py",
    "failover_proxy/dataplane/http2/downstream.py",
    "failover_proxy/dataplane/http2/upstream.py",
    "failover_proxy/dataplane/http1/tunnel.py",
    "failover_proxy/dataplane/plane.py",
]

extensions = []
if os.environ.get("FAILOVER_PROXY_PURE") == "1":
    built = ["failover_proxy/**/*.so", "*__mypyc*.so"]
    for stale in [path for pattern in built for path in HERE.glob(pattern)]:
        stale.unlink()
else:
    from mypyc.build import mypycify

    extensions = mypycify(["--strict", *COMPILED], opt_level="3")
if os.environ.get("FAILOVER_PROXY_PURE") != "1" and sys.platform.startswith("linux"):
    extensions += [
        Extension(f"failover_proxy.{name.replace('/', '.')}", [f"failover_proxy/{name}.c"])
        for name in ("dataplane/io/_direct", "dataplane/io/_reads", "dataplane/http1/_fields")
    ]
if os.environ.get("FAILOVER_PROXY_PURE") != "1" and Path(NGHTTP2_HEADER).exists():
    extensions.append(Extension(
        "failover_proxy.dataplane.http2._session", ["failover_proxy/dataplane/http2/_session.c"],
        libraries=["nghttp2"],
    ))

setup(ext_modules=extensions)
