"""Slow link or dead peer? One TCP connect (and TLS hello) tells them apart when a Dask handshake timed out.

A coordinator that accepts a TCP connection is alive: a join that ran out of time behind it is a slow
link (or a busy coordinator), and the right answer is to wait longer, scaled by the round trip just
measured, not to report it unreachable. A refused or silent TCP connect is a peer that is not there.
"""

from __future__ import annotations

import socket
import time

__all__ = ["patient_timeout", "tcp_probe"]


def tcp_probe(address: str, timeout: float = 5.0) -> tuple[float | None, str]:
    """(the round trip to ``address``, "") or (None, why nothing answered). For ``tls://`` the time of a TCP
    connect and a TLS handshake, halved (two round trips; no certificate is sent, so the peer refuses us
    right after: we only time it); for others, one TCP connect."""
    import ssl

    from distributed.comm import parse_address, parse_host_port

    try:
        scheme, loc = parse_address(address)
        host, port = parse_host_port(loc)
    except (ValueError, TypeError) as e:
        return None, f"not an address: {e}"
    t0 = time.perf_counter()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            if scheme != "tls":
                return time.perf_counter() - t0, ""
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # timing only: nothing is sent or believed over it
            try:
                with ctx.wrap_socket(sock, server_hostname=host):
                    pass
            except (ssl.SSLError, ConnectionError):
                pass  # refused after answering: the peer is there
            return (time.perf_counter() - t0) / 2, ""
    except TimeoutError:
        return None, f"no answer from {host}:{port} within {timeout:g}s"
    except OSError as e:
        return None, f"{host}:{port}: {e.strerror or e}"


def patient_timeout(configured: float, rtt: float) -> float:
    """How long to give a join on a link with round trip ``rtt``: the configured time, or 30 round
    trips (a join takes about ten: TCP, TLS, Dask's handshake, registration) when that is longer."""
    return max(configured, 30.0 * rtt)
