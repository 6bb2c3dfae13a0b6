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

# webjobsd.client.commands has the same pair: the client is imported only by its verbs.
KINDS = ("continuous", "triggered")


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

    _client_verbs(verbs)
    verbs.add_parser("version", help="print the version")
    verbs.add_parser(
        "hash-password", help="read a password and print its hash for auth_password_hash"
    )
    return parser


def _client_verbs(verbs: Any) -> None:
    """Verbs that talk to a running daemon over HTTP (webjobsd.client)."""

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(name, help=help_text)
        parser.add_argument("--url", help="the daemon's API (default WEBJOBSD_URL, the config)")
        parser.add_argument("--username", help="default WEBJOBSD_USERNAME")
        parser.add_argument("--password", help="default WEBJOBSD_PASSWORD")
        parser.add_argument("--config", type=Path, help="the daemon's YAML configuration")
        return parser

    def typed(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--type", choices=KINDS, help="when the name is in both kinds")

    typed(verb("jobs", "list the jobs"))
    show = verb("show", "one job, every field")
    show.add_argument("name")
    typed(show)
    run = verb("run", "run a triggered job: webjobsd run NAME [--wait|--follow] -- ARGS...")
    run.add_argument("name")
    run.add_argument("arguments", nargs="*", help="arguments for the script (after --)")
    run.add_argument("--wait", action="store_true", help="wait; exit 0 only on Success")
    run.add_argument("--follow", action="store_true", help="print the output live, then --wait")
    run.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    logs = verb("logs", "a job's log (a triggered job: its latest run's output)")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    typed(logs)
    history = verb("history", "a triggered job's runs")
    history.add_argument("name")
    for name, text in (("stop", "stop a continuous job"), ("start", "start a continuous job")):
        verb(name, text).add_argument("name")
    deploy = verb("deploy", "upload a folder, a zip or a single script as a job")
    deploy.add_argument("path", type=Path)
    deploy.add_argument("--type", choices=KINDS, required=True)
    deploy.add_argument("--name", help="job name (default: the folder or file name)")
    delete = verb("delete", "stop and delete a job")
    delete.add_argument("name")
    typed(delete)
    settings = verb("settings", "show a job's settings.job, or set KEY=VALUE pairs in it")
    settings.add_argument("name")
    settings.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    typed(settings)
    site = verb("deploy-site", "deploy the whole site from a folder or a zip (Kudu's zipdeploy)")
    site.add_argument("path", type=Path, metavar="PATH|ZIP")
    site.add_argument("--clean", action="store_true", help="delete files the package lacks")
    site.add_argument("--wait", action="store_true", help="print the log; exit 0 only on Success")
    site.add_argument("--message", help="the deployment's message")
    site.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    deployments = verb("deployments", "the site's deployments, or one (an id or `latest`)")
    deployments.add_argument("id", nargs="?", metavar="ID", help="a deployment's id, or latest")
    deployments.add_argument("--log", action="store_true", help="print its log (default latest)")


CLIENT_VERBS = frozenset(
    {"jobs", "show", "run", "logs", "history", "stop", "start", "deploy", "delete", "settings"}
    | {"deploy-site", "deployments"}
)


def _run_client(args: argparse.Namespace) -> int:
    from webjobsd.client import commands, deployments
    from webjobsd.client.connection import ApiClient, ClientError, resolve_target

    out = sys.stdout
    try:
        client = ApiClient(
            resolve_target(
                url=args.url,
                username=args.username,
                password=args.password,
                config_path=args.config,
                environ=os.environ,
            )
        )
        kind = getattr(args, "type", None)
        match args.verb:
            case "jobs":
                return commands.cmd_jobs(client, out, kind)
            case "show":
                return commands.cmd_show(client, out, args.name, kind)
            case "run":
                return commands.cmd_run(
                    client,
                    out,
                    args.name,
                    args.arguments,
                    wait=args.wait,
                    follow=args.follow,
                    timeout_s=args.timeout,
                )
            case "logs":
                return commands.cmd_logs(client, out, args.name, kind, follow=args.follow)
            case "history":
                return commands.cmd_history(client, out, args.name)
            case "stop" | "start":
                return commands.cmd_stop_start(client, out, args.verb, args.name)
            case "deploy":
                return commands.cmd_deploy(
                    client, out, args.path, args.type, args.name, progress=sys.stderr.isatty()
                )
            case "delete":
                return commands.cmd_delete(client, out, args.name, kind)
            case "deploy-site":
                return deployments.cmd_deploy_site(
                    client,
                    out,
                    args.path,
                    clean=args.clean,
                    wait=args.wait,
                    message=args.message,
                    timeout_s=args.timeout,
                    progress=sys.stderr.isatty(),
                )
            case "deployments":
                return deployments.cmd_deployments(client, out, args.id, log=args.log)
            case _:
                return commands.cmd_settings(client, out, args.name, kind, args.pairs)
    except ClientError as error:
        print(f"webjobsd: {error.message}", file=sys.stderr)
        return int(error.code)
    except KeyboardInterrupt:
        return 130


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
    parser.add_argument(
        "--watch",
        choices=["inotify", "poll"],
        help="how file changes are found (default inotify; poll for NFS, CephFS, EFS)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        metavar="SECONDS",
        help="poll mode: period of the full scan (default 1.0)",
    )
    parser.add_argument("--log-format", choices=["auto", "console", "json"])
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "site": str(args.site) if args.site else None,
        # A path typed on the command line is relative to where it was typed.
        "jobs_root": str(args.jobs_root.absolute()) if args.jobs_root else None,
        "instance_id": args.instance_id,
        "listen": args.listen,
        "watch": args.watch,
        "poll_interval_s": args.poll_interval,
        "log_format": args.log_format,
        "log_level": args.log_level,
    }


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` belongs to the job (`webjobsd run NAME -- ARGS`): argparse's
    # sub-commands do not hand `--` on to a positional, so it is split off here.
    passthrough: list[str] = []
    if "--" in words:
        at = words.index("--")
        words, passthrough = words[:at], words[at + 1 :]
    args = _parser().parse_args(words)
    if passthrough:
        if args.verb != "run":
            print("webjobsd: '--' only precedes a run's arguments", file=sys.stderr)
            return 2
        args.arguments = [*args.arguments, *passthrough]
    if args.verb == "version":
        print(__version__)
        return 0
    if args.verb in CLIENT_VERBS:
        return _run_client(args)
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
        if config.tls_certificate is not None and config.tls_key is not None:
            from webjobsd.http.tls import TlsError, load_server_tls

            try:
                load_server_tls(config.tls_certificate, config.tls_key)
            except TlsError as error:
                print(f"webjobsd: configuration error: {error}", file=sys.stderr)
                return 2
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
