"""``flowdppo-video serve-rewards``: run a config's rewards as an HTTP service (:mod:`rewards.server`).

The config is a YAML file with a ``rewards:`` mapping (the training syntax: weights or
``{type, weight, retries, **options}``) and an optional ``server:`` section with the defaults of
the command-line flags below; a training recipe can be served as it is (its other sections are
ignored). The bearer token comes from ``--token`` or the ``FLOWDPPO_REWARD_TOKEN`` environment
variable, never from the file. Training uses the served rewards through the ``remote`` reward
(:mod:`rewards.remote`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import logging
import os
from typing import Any

from flowdppo_video.runs.config import Config, ConfigError, load_yaml
from rewards.server import bind_socket, create_app, http_url, uvicorn_server

TOKEN_ENV = "FLOWDPPO_REWARD_TOKEN"
# server: keys, their defaults and types (the flags of the same names override them)
SERVER_DEFAULTS: dict[str, Any] = {"host": "127.0.0.1", "port": 8765, "max_request_mb": 256.0,
                                   "batch_window_ms": 10.0, "max_batch": 32}


def add_parser(subparsers: Any) -> None:
    """Add ``serve-rewards`` to the CLI's subparsers."""
    s = subparsers.add_parser("serve-rewards", help="serve a config's rewards over HTTP (used by the 'remote' reward)")
    s.add_argument("--config", required=True, help="YAML with a rewards: mapping (and optionally server:)")
    s.add_argument("--host", help=f"address to bind (default {SERVER_DEFAULTS['host']}: this machine only)")
    s.add_argument("--port", type=int, help=f"TCP port (default {SERVER_DEFAULTS['port']}; 0: a free one)")
    s.add_argument("--token", help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}, else none)")
    s.add_argument("--max-request-mb", type=float, help=f"413 above this body size (default "
                                                        f"{SERVER_DEFAULTS['max_request_mb']:g})")
    s.add_argument("--batch-window-ms", type=float, help="wait this long to group concurrent requests "
                                                         f"(default {SERVER_DEFAULTS['batch_window_ms']:g})")
    s.add_argument("--max-batch", type=int,
                   help=f"most videos per reward call (default {SERVER_DEFAULTS['max_batch']})")
    s.add_argument("--allow-open", action="store_true",
                   help="serve a non-loopback --host without a token (anyone who reaches the port can use it)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.set_defaults(func=serve_rewards)


def load_server_config(path: str, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(rewards entries, server settings)`` from the YAML at ``path`` and the flags; errors name the key."""
    data = load_yaml(path)
    training = {f.name for f in dataclasses.fields(Config)}
    for k in data:
        if k not in training | {"server"}:
            near = difflib.get_close_matches(str(k), sorted(training | {"server"}), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"unknown key {k!r} in {path}{hint}: a reward server config holds rewards: and server:")
    if "rewards" not in data:
        raise ConfigError(f"{path} has no rewards: mapping to serve, e.g. rewards: {{world_direction: 1.0}}")
    server = data.get("server") or {}
    if not isinstance(server, dict):
        raise ConfigError(f"server in {path} must be a mapping, got {server!r}")
    for k in server:
        if k not in SERVER_DEFAULTS:
            near = difflib.get_close_matches(str(k), list(SERVER_DEFAULTS), n=1)
            hint = f" (did you mean server.{near[0]}?)" if near else ""
            raise ConfigError(f"unknown key server.{k} in {path}{hint}; known: {', '.join(SERVER_DEFAULTS)}")
    out = {**SERVER_DEFAULTS, **server}
    for k in SERVER_DEFAULTS:
        flag = getattr(args, k, None)
        if flag is not None:
            out[k] = flag
    for k, default in SERVER_DEFAULTS.items():
        v = out[k]
        kinds = (str,) if isinstance(default, str) else (int,) if isinstance(default, int) else (int, float)
        if isinstance(v, bool) or not isinstance(v, kinds):
            raise ConfigError(f"server.{k} must be a {type(default).__name__}, got {v!r}")
    if not 0 <= out["port"] <= 65535:
        raise ConfigError(f"server.port must be in 0..65535, got {out['port']}")
    if out["max_request_mb"] <= 0 or out["batch_window_ms"] < 0 or out["max_batch"] < 1:
        raise ConfigError(f"server limits: max_request_mb > 0, batch_window_ms >= 0, max_batch >= 1; got "
                          f"{out['max_request_mb']}, {out['batch_window_ms']}, {out['max_batch']}")
    return data["rewards"], out


def serve_rewards(args: argparse.Namespace) -> None:
    """Build the rewards (an unknown reward or option is a one-line error), bind, serve until Ctrl-C."""
    entries, opts = load_server_config(args.config, args)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    check_token(token, "--token" if args.token is not None else f"${TOKEN_ENV}")
    check_open_bind(opts["host"], token, getattr(args, "allow_open", False))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(entries, token=token, max_request_bytes=int(opts["max_request_mb"] * (1 << 20)),
                     batch_window_s=opts["batch_window_ms"] / 1e3, max_batch=opts["max_batch"])
    host, port = opts["host"], opts["port"]
    try:
        sock = bind_socket(host, port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    log = logging.getLogger("rewards.server")
    if not _is_loopback(host) and not token:   # only with --allow-open (check_open_bind)
        log.warning("listening on %s without a token (--allow-open): anyone who can reach this port can use "
                    "the rewards", host)
    log.info("serving %s on %s (%s; batches of <= %d videos within %g ms; requests <= %g MB)",
             ", ".join(app.state.rewards), http_url(host, port), "token required" if token else "no token",
             opts["max_batch"], opts["batch_window_ms"], opts["max_request_mb"])
    try:
        uvicorn_server(app, args.log_level).run(sockets=[sock])
    except KeyboardInterrupt:   # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
        pass
    st = app.state.stats
    log.info("stopped after %d requests (%d videos in %d reward calls; %d rejected, %d failed)",
             st.requests_ok, st.videos_scored, st.reward_calls, st.requests_rejected, st.requests_failed)


def check_token(token: str | None, where: str) -> None:
    """A token of blanks (a quoting slip) would guard the server with a secret nobody can send."""
    if token is not None and (not token.strip() or token != token.strip()):
        raise ConfigError(f"{where} is blank or has spaces around it: give the token itself")


def check_open_bind(host: str, token: str | None, allow_open: bool) -> None:
    """Refuse, before building anything, to serve a non-loopback address without a token unless
    the user said so with ``--allow-open`` (a warning alone is hidden by ``--log-level error``)."""
    if not token and not allow_open and not _is_loopback(host):
        raise ConfigError(f"--host {host} is reachable from other machines and no token is set: give --token "
                          f"(or ${TOKEN_ENV}), or --allow-open to serve it to anyone who reaches the port")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
