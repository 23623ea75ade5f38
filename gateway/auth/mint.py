"""`gateway-credentials`: mint an API key or hash a password for a consumer, and print the config entry.

Rule: a secret is shown once, to the operator who asked for it, and the config only ever receives its hash.
The API key goes to standard output on its own line (so `| head -1` captures it); the TOML entry follows.

    gateway-credentials api-key reports-app
    gateway-credentials password alice          # asks for the password (twice) on the terminal
    printf '%s' "$PW" | gateway-credentials password alice --stdin
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

import bcrypt

from gateway.auth.apikeys import hash_key, mint_key
from gateway.auth.basic import MAX_PASSWORD_BYTES
from gateway.auth.settings.model import CONSUMER_NAME

__all__ = ["main"]


def _consumer(name: str) -> str:
    if not CONSUMER_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError("a consumer name may contain only letters, digits and -_. (at most 128)")
    return name


def _table(name: str) -> str:
    """The TOML table header for consumer `name` (quoted when it is not a bare key)."""
    bare = all(c.isalnum() or c in "_-" for c in name)
    return f"[consumers.{name}]" if bare else f'[consumers."{name}"]'


def _api_key(args: argparse.Namespace) -> int:
    key = mint_key()
    print(key)
    print(
        f"\n# The key above is shown only now. Add its hash to the consumer (keep older hashes while clients "
        f'move to the new key):\n{_table(args.consumer)}\napi_keys = ["{hash_key(key)}"]',
        file=sys.stdout,
    )
    return 0


def _password(args: argparse.Namespace) -> int:
    if args.stdin:
        password = sys.stdin.read().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.consumer}: ")
        if getpass.getpass("Again: ") != password:
            print("gateway-credentials: the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("gateway-credentials: the password is empty", file=sys.stderr)
        return 1
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        print(f"gateway-credentials: bcrypt takes at most {MAX_PASSWORD_BYTES} bytes of password", file=sys.stderr)
        return 1
    hashed = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=args.cost)).decode("ascii")
    print(f'{_table(args.consumer)}\npassword = "{hashed}"')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway-credentials", description="Mint API keys and hash passwords for the gateway's consumers."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    key = commands.add_parser("api-key", help="mint a new API key; prints the key once and its config entry")
    key.add_argument("consumer", type=_consumer)
    key.set_defaults(run=_api_key)
    password = commands.add_parser("password", help="hash a password for HTTP Basic; prints the config entry")
    password.add_argument("consumer", type=_consumer)
    password.add_argument("--stdin", action="store_true", help="read the password from standard input")
    password.add_argument(
        "--cost",
        type=int,
        default=12,
        choices=range(4, 16),
        metavar="{4..15}",
        help="bcrypt cost (default 12: about 0.25 s per check on one core)",
    )
    password.set_defaults(run=_password)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
