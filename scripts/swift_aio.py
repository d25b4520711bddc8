#!/usr/bin/python3
"""Helpers for ``scripts/services``: Swift rings, an xattr check and a readiness wait.

Runs with Debian's ``/usr/bin/python3``, where ``python3-swift`` is installed (the project's venv has
no ``swift`` package). Only the ``rings`` subcommand imports Swift; the others use the standard library.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request


def build_rings(swift_dir: str, ip: str, ports: dict[str, int], device: str, part_power: int) -> None:
    """Write ``account``/``container``/``object`` rings with one device and one replica each.

    Built in-process with ``RingBuilder``: one ``swift-ring-builder`` call per step costs a Python start
    and a Swift import each (3.2 s for the nine calls on a 2-core machine, against 0.4 s here).
    """
    from swift.common.ring import RingBuilder  # only in Debian's python3-swift

    for kind, port in ports.items():
        builder = RingBuilder(part_power, 1, 1)
        builder.add_dev(
            {
                "id": 0,
                "region": 1,
                "zone": 1,
                "ip": ip,
                "port": port,
                "replication_ip": ip,
                "replication_port": port,
                "device": device,
                "weight": 100.0,
                "meta": "",
            }
        )
        builder.rebalance()
        # Write under a temporary name, then rename: a server starting meanwhile never sees half a ring.
        final = os.path.join(swift_dir, f"{kind}.ring.gz")
        tmp = final + ".tmp"
        builder.get_ring().save(tmp)
        os.replace(tmp, final)
        builder.save(os.path.join(swift_dir, f"{kind}.builder"))


def check_xattr(directory: str) -> int:
    """Exit non-zero unless files in ``directory`` take ``user.*`` extended attributes (Swift needs them)."""
    with tempfile.NamedTemporaryFile(dir=directory) as probe:
        try:
            os.setxattr(probe.name, "user.wmltrain.probe", b"1")
            ok = os.getxattr(probe.name, "user.wmltrain.probe") == b"1"
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                raise
            ok = False
    if not ok:
        print(
            f"{directory}: this filesystem does not support user extended attributes, which Swift's "
            "object server needs; set WMLTRAIN_SERVICES_DIR to a directory on ext4/xfs/btrfs/tmpfs",
            file=sys.stderr,
        )
        return 1
    return 0


def _request(
    url: str, headers: dict[str, str] | None = None, method: str = "GET", data: bytes | None = None
) -> tuple[int, dict[str, str]]:
    # The URLs are the proxy's own http:// endpoint or the storage URL it hands out (checked in main).
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            resp.read()
            return resp.status, dict(resp.headers.items())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items())


def wait_swift(url: str, user: str, key: str, timeout: float) -> int:
    """Wait until the proxy's healthcheck answers and a tempauth-authenticated account HEAD succeeds."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            status, _ = _request(f"{url}/healthcheck")
            if status != 200:
                last = f"healthcheck answered {status}"
                raise ConnectionError(last)
            status, headers = _request(f"{url}/auth/v1.0", {"X-Auth-User": user, "X-Auth-Key": key})
            if status != 200:
                last = f"auth answered {status}"
                raise ConnectionError(last)
            token = headers["X-Auth-Token"]
            storage_url = headers["X-Storage-Url"]
            # The account HEAD goes through proxy -> account server (autocreated on first PUT only,
            # so 204 or 404 both prove the backend answered; 5xx means it did not).
            status, _ = _request(storage_url, {"X-Auth-Token": token}, method="HEAD")
            if status >= 500:
                last = f"account HEAD answered {status}"
                raise ConnectionError(last)
            # A full object cycle proves the container and object servers answer too. The probe
            # container is removed again, so that S3 bucket listings do not show it.
            probe = f"{storage_url}/wmltrain-ready-{os.getpid()}"
            auth = {"X-Auth-Token": token}
            for step_url, method, ok in (
                (probe, "PUT", (201, 202)),
                (f"{probe}/probe", "PUT", (201,)),
                (f"{probe}/probe", "GET", (200,)),
                (f"{probe}/probe", "DELETE", (204,)),
                (probe, "DELETE", (204,)),
            ):
                body = (b"ok" if step_url.endswith("/probe") else b"") if method == "PUT" else None
                status, _ = _request(step_url, auth, method=method, data=body)
                if status not in ok:
                    last = f"{method} {step_url} answered {status}"
                    raise ConnectionError(last)
            print(json.dumps({"storage_url": storage_url}))
            return 0
        except (OSError, ConnectionError, KeyError) as exc:
            last = str(exc) or last
        time.sleep(0.2)
    print(f"Swift at {url} not ready after {timeout:.0f} s: {last}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rings = sub.add_parser("rings", help="build the three rings in SWIFT_DIR")
    rings.add_argument("swift_dir")
    rings.add_argument("--ip", default="127.0.0.1")
    rings.add_argument("--account-port", type=int, required=True)
    rings.add_argument("--container-port", type=int, required=True)
    rings.add_argument("--object-port", type=int, required=True)
    rings.add_argument("--device", default="d1")
    rings.add_argument("--part-power", type=int, default=8)
    xattr = sub.add_parser("xattr-check", help="check that DIR supports user xattrs")
    xattr.add_argument("directory")
    wait = sub.add_parser("wait-swift", help="wait until the proxy at URL serves authenticated requests")
    wait.add_argument("url")
    wait.add_argument("--user", required=True)
    wait.add_argument("--key", required=True)
    wait.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    if args.cmd == "rings":
        ports = {"account": args.account_port, "container": args.container_port, "object": args.object_port}
        build_rings(args.swift_dir, args.ip, ports, args.device, args.part_power)
        return 0
    if args.cmd == "xattr-check":
        return check_xattr(args.directory)
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"not an http(s) URL: {args.url}")
    return wait_swift(args.url.rstrip("/"), args.user, args.key, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
