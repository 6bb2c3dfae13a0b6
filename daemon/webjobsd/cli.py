"""The command line: argument parsing only; every verb calls into the package."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from webjobsd import __version__
from webjobsd.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webjobsd", description="Hosts background jobs the way Kudu hosts Azure WebJobs."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the daemon")
    _config_flags(serve)
    serve.add_argument(
        "--no-auth", action="store_true", help="serve the HTTP API without authentication"
    )

    check = verbs.add_parser("check-config", help="validate the configuration and exit")
    _config_flags(check)

    verbs.add_parser("version", help="print the version")
    verbs.add_parser(
        "hash-password", help="read a password and print its hash for auth_password_hash"
    )
    return parser


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site", type=Path, help="site root (default from the config, /home)")
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument(
        "--jobs-root",
        type=Path,
        help="folder holding continuous/ and triggered/ job folders (default: the site's "
        "site/wwwroot/App_Data/jobs)",
    )
    parser.add_argument("--instance-id", help="instance id (default WEBSITE_INSTANCE_ID, host)")
    parser.add_argument("--listen", help="HOST:PORT of the HTTP API (default 127.0.0.1:8181)")
    parser.add_argument("--log-format", choices=["auto", "console", "json"])
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "site": str(args.site) if args.site else None,
        # A path typed on the command line is relative to where it was typed.
        "jobs_root": str(args.jobs_root.absolute()) if args.jobs_root else None,
        "instance_id": args.instance_id,
        "listen": args.listen,
        "log_format": args.log_format,
        "log_level": args.log_level,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "version":
        print(__version__)
        return 0
    if args.verb == "hash-password":
        from webjobsd.http.auth import hash_password_command

        return hash_password_command()
    overrides = _overrides(args)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"webjobsd: configuration error: {error}", file=sys.stderr)
        return 2
    if args.verb == "check-config":
        print(f"configuration OK (site {config.site})")
        return 0
    from webjobsd.app import serve

    return serve(
        config,
        environ=os.environ,
        config_path=args.config,
        overrides=overrides,
        auth_enabled=not args.no_auth,
    )
