"""The documentation against the code: every config key the loader accepts is documented in
docs/configuration.md, every TOML example in README.md and docs/ still loads (`--check`), every relative link
resolves, and README's command 2 is the one CI runs.

How the keys are found: by running the loader, not by reading its source. Every table of the config declares the
keys it accepts with `Table.known(...)` as soon as it is opened (gateway/config/, gateway/auth/settings/), so
`parse` of a config that opens every table, with `known` wrapped to record what each table declared, gives the whole
set: keys assembled from constants, comprehensions and other modules (`*ROUTE_ADMISSION_KEYS`, `_METHOD_KEYS`) come
out as the loader sees them, and a key is tied to the table it is in (`timeouts.connect`, not just `connect`). The
parse does not have to succeed (a key is declared before its value is read). Two checks keep that config maximal as
the loader grows: every `.known(` call in gateway/ must have run, and every key a table declared must be written in
at least one table of that kind in the config.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway import config, tap
from gateway.config.values import Table

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"

NAME = "NAME"
"""How docs/configuration.md writes the name of a named table (`[upstreams.NAME]`, `[auth.NAME]`)."""

# A config with every table and every key in it (values need not be valid: only the declared keys are read).
# The jwt method lists all four key sources and both listeners' TLS tables name files that may not exist: errors,
# which do not matter here.
MAXIMAL = """\
[server]
idle_timeout = "60s"
head_timeout = "10s"
max_connections = 100
lingering_timeout = "5s"
lingering_max_bytes = "16MiB"
via = "gateway"
underscores_in_headers = false
workers = 1
drain_timeout = "30s"
trusted_proxies = ["10.0.0.0/8"]
server_header = "gateway"
hide_response_headers = ["Server"]

[timeouts]
connect = "5s"
response_headers = "60s"
upstream_idle = "60s"
upstream_send_stall = "60s"
client_body_idle = "60s"
client_send_stall = "60s"

[limits]
max_request_body_bytes = "1GiB"
max_request_line_bytes = "8KiB"
max_header_bytes = "16KiB"
max_header_count = 100

[limits.store]
type = "redis"
url = "rediss://127.0.0.1:6379/0"
username = "gateway"
password_file = "redis.pass"
ca_file = "redis-ca.pem"
timeout = "10ms"
connect_timeout = "1s"
pool_size = 2
prefix = "gateway:"
lease_ttl = "30s"

[flow_control]
high_water = "256KiB"
low_water = "64KiB"

[[listeners]]
host = "127.0.0.1"
port = 8080
backlog = 511
proxy_protocol = true
proxy_protocol_from = ["10.0.1.0/24"]

[[listeners]]
host = "127.0.0.1"
port = 8081
redirect_to_https = 8443

[[listeners]]
host = "127.0.0.1"
port = 8443
[listeners.tls]
min_version = "1.2"
client_certificates = "request"
client_ca = "ca.pem"
trusted_ca = "ca.pem"
strict_certificates = false
[[listeners.tls.certificates]]
certificate = "cert.pem"
key = "key.pem"
chain = "chain.pem"

[[listeners]]
systemd = "http"

[access_log]
path = "-"
query = false

[admin]
host = "127.0.0.1"
port = 9901

[upstreams.plain]
url = "http://127.0.0.1:8081"
max_connections = 256
max_queue = 512
queue_timeout = "10s"
idle_timeout = "4s"
max_idle_connections = 64
balance = "round_robin"
hash_on = "client_address"
max_requests_per_server = 0
[upstreams.plain.ejection]
consecutive_failures = 5
base_time = "30s"
max_time = "300s"
max_ejected_percent = 50
statuses = [502, 503, 504]
[upstreams.plain.retry_budget]
percent = 20
window = "10s"
min_retries = 10

[upstreams.several]
servers = [{ url = "http://10.0.0.1:8081", weight = 2 }, { url = "http://10.0.0.2:8081" }]
[upstreams.several.health_check]
path = "/healthz"
method = "GET"
host = "several.internal"
statuses = [200]
interval = "10s"
timeout = "2s"
healthy_threshold = 2
unhealthy_threshold = 3

[upstreams.secure]
url = "https://billing.internal:8443"
resolve = "30s"
[upstreams.secure.tls]
verify = true
ca = "ca.pem"
server_name = "billing.internal"
certificate = "cert.pem"
key = "key.pem"
chain = "chain.pem"

[[routes]]
name = "every-key"
auth = ["keys"]
scopes_any = ["a"]
scopes_all = ["b"]
forward_credentials = false
rate_limit_headers = true
limit_store_failure = "open"
host = "api.example.com"
path_prefix = "/api"
strip_prefix = true
upstream = "plain"
host_header = "upstream"
allow_methods = ["TRACE"]
strict_transport_security = "max-age=31536000"
hide_response_headers = []
[routes.timeouts]
connect = "5s"
response_headers = "60s"
upstream_idle = "60s"
upstream_send_stall = "60s"
client_body_idle = "60s"
client_send_stall = "60s"
[routes.limits]
max_request_body_bytes = "4GiB"
[routes.flow_control]
high_water = "256KiB"
low_water = "64KiB"
[routes.websocket]
enabled = true
idle_timeout = "1h"
max_lifetime = "12h"
[routes.cors]
allow_origins = ["https://app.example.com", "https://*.example.com"]
allow_methods = ["GET", "PUT"]
allow_headers = ["Authorization"]
expose_headers = ["ETag"]
allow_credentials = true
max_age = "10m"
[routes.retries]
attempts = 2
unsafe_methods = false
max_body_bytes = "64KiB"
backoff = "25ms"
max_backoff = "250ms"

[admission]
realm = "gateway"
credentials_file = "consumers.toml"
max_concurrent = 100
[admission.identity_headers]
consumer = "X-Consumer-ID"
scopes = "X-Consumer-Scopes"
method = "X-Auth-Method"
[admission.rate_limits]
consumer = { rate = "100/s", burst = 200 }
anonymous = { rate = "50/s", burst = 50 }
failed_auth = { rate = "10/m", burst = 10 }
failed_auth_per_address = { rate = "100/m", burst = 100 }

[auth.keys]
type = "api_key"
headers = ["Authorization: Bearer", "X-API-Key"]

[auth.corp]
type = "jwt"
issuer = "https://id.example.com/"
audiences = ["gateway"]
algorithms = ["RS256"]
public_key_file = "key.pem"
jwks_file = "jwks.json"
jwks_url = "https://id.example.com/jwks.json"
secret_file = "secret"
jwks_refresh_interval = "60s"
jwks_max_age = "1h"
jwks_fetch_timeout = "5s"
leeway = "30s"
require_exp = true
consumer_claim = "sub"
scope_claims = ["scope", "scp"]
cache_size = 10000
[auth.corp.claim_headers]
X-User-Email = "email"

[auth.login]
type = "basic"
realm = "reports"
threads = 1
max_pending = 256
cache_ttl = "30s"

[auth.sso]
type = "forward"
url = "http://127.0.0.1:9000/check"
timeout = "5s"
request_headers = ["Authorization"]
copy_headers = ["X-User"]
consumer_header = "X-User-Name"
scopes_header = "X-User-Scopes"
credential_headers = ["Authorization"]
max_connections = 64
max_body = "64KiB"

[auth.certs]
type = "mtls"
identity_header = "X-Client-Subject"

[consumers.app]
scopes = ["a", "b"]
api_keys = ["sha256:cb5555b29b00557f1ffcacdc8e763783b9613c07c56333f7bb5de09139c9b34e"]
password = "$2b$04$abcdefghijklmnopqrstuu5Kq0E4S0lJ5dQ3T2eVzq1C4Zc8cZ9aG"
rate_limit = { rate = "20/s", burst = 40 }
max_concurrent = 10
client_certificates = ["cn:app"]
"""

CREDENTIALS_FILE = """\
[consumers.other]
scopes = ["a"]
"""


# --- the keys the loader accepts ------------------------------------------------------------------------------


_SUBSCRIPT = re.compile(r'\[(?:\d+|"(?:[^"\\]|\\.)*")\]')
"""An item's subscript in a key path: `[2]`, `["api"]`."""


class Schema:
    """What a parse of MAXIMAL declared: the keys of each kind of table (`routes.timeouts`, `auth.NAME`), the
    keys written in the config for each kind, and the `.known(` call sites that ran."""

    def __init__(self) -> None:
        self.keys: dict[str, set[str]] = defaultdict(set)
        self.written: dict[str, set[str]] = defaultdict(set)
        self.call_sites: set[tuple[str, int]] = set()
        self.named: set[str] = set()
        """Paths of tables of named tables (`upstreams`, `auth`, `consumers`)."""
        self.raw: list[tuple[str, tuple[str, ...], list[str]]] = []

    def kind(self, path: str) -> str:
        """A table's path as docs/configuration.md names its kind: subscripts dropped (`routes["x"].timeouts` is
        `routes.timeouts`), a named table's name as NAME (`upstreams.api.tls` is `upstreams.NAME.tls`)."""
        path = _SUBSCRIPT.sub("", path)
        for outer in sorted({_SUBSCRIPT.sub("", n) for n in self.named}, key=len):
            if path.startswith(outer + "."):
                rest = path[len(outer) + 1 :].split(".", 1)
                path = ".".join([outer, NAME, *rest[1:]])
        return path


def _collect(tmp: Path) -> Schema:
    schema = Schema()
    original_known = Table.known
    original_named = Table.named_tables

    def known(self: Table, keys: Any) -> None:
        keys = tuple(keys)
        caller = sys._getframe(1)
        schema.call_sites.add((str(Path(caller.f_code.co_filename).resolve().relative_to(ROOT)), caller.f_lineno))
        schema.raw.append((self.path_of("").removesuffix("."), keys, self.names()))
        original_known(self, keys)

    def named_tables(self: Table, key: str) -> list[tuple[str, Table]]:
        schema.named.add(self.path_of(key))
        return original_named(self, key)

    (tmp / "consumers.toml").write_text(CREDENTIALS_FILE)
    source = tmp / "gateway.toml"
    source.write_text(MAXIMAL)
    patch = pytest.MonkeyPatch()
    patch.setattr(Table, "known", known)
    patch.setattr(Table, "named_tables", named_tables)
    try:
        config.load(source)
    except config.ConfigError:
        pass  # files that do not exist, four JWT key sources: only the declared keys matter
    finally:
        patch.undo()
    for path, keys, written in schema.raw:
        schema.keys[schema.kind(path)].update(keys)
        schema.written[schema.kind(path)].update(written)
    return schema


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Schema:
    return _collect(tmp_path_factory.mktemp("maximal"))


def _known_call_sites() -> set[tuple[str, int]]:
    """Every `something.known(...)` call in gateway/, by file and line."""
    sites = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "known":
                sites.add((str(path.relative_to(ROOT)), node.lineno))
    return sites


def test_the_maximal_config_opens_every_table(schema: Schema) -> None:
    """Every `.known(` call in gateway/ ran while MAXIMAL was parsed: no kind of table was left unopened."""
    missing = _known_call_sites() - schema.call_sites
    assert not missing, f"add a table to MAXIMAL in tests/test_docs.py that reaches these known() calls: {missing}"


def test_the_maximal_config_writes_every_key(schema: Schema) -> None:
    """Every key a table declared is written in at least one table of that kind in MAXIMAL (so a new sub-table
    is opened, and its own keys declared)."""
    missing = sorted(
        f"{kind}.{key}".lstrip(".") for kind, keys in schema.keys.items() for key in keys - schema.written[kind]
    )
    assert not missing, f"write these keys in MAXIMAL in tests/test_docs.py: {missing}"


def test_the_schema_is_what_the_loader_reads(schema: Schema) -> None:
    """A few keys known to be there, at the paths known to hold them (the instrumentation works)."""
    assert "max_request_line_bytes" in schema.keys["limits"]
    assert "connect" in schema.keys["routes.timeouts"]
    assert {"certificate", "key", "chain"} <= schema.keys["listeners.tls.certificates"]
    assert "identity_header" in schema.keys["auth.NAME"]
    assert {"rate", "burst"} <= schema.keys["admission.rate_limits.failed_auth"]
    assert "consumers" in schema.keys[""]


# --- docs/configuration.md ------------------------------------------------------------------------------------


def _sections(text: str) -> Iterator[tuple[list[str], set[str]]]:
    """Each section of a Markdown file: the table kinds its heading names in backticks (`[server]`,
    `[[routes]]`, `[upstreams.NAME.tls]`, `[admission.rate_limits.*]`), and the backticked names in the first cell
    of its table rows (the keys it documents)."""
    heading: list[str] = []
    rows: set[str] = set()
    fenced = False
    for line in [*text.splitlines(), "# end"]:
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        if re.match(r"#{1,6} ", line):
            yield heading, rows
            heading = re.findall(r"`\[\[?([^`\[\]]+)\]\]?`", line)
            rows = set()
        elif line.startswith("|"):
            rows.update(re.findall(r"`([^`]+)`", line.split("|")[1]))


def _undocumented(schema: Schema, text: str) -> list[str]:
    sections = list(_sections(text))
    missing = []
    for kind, keys in sorted(schema.keys.items()):
        if kind == "":
            for key in sorted(keys):
                if not any(t == key or t.startswith(key + ".") for heading, _ in sections for t in heading):
                    missing.append(f"[{key}] (no section heading names it)")
            continue
        documented: set[str] = set()
        for heading, rows in sections:
            if any(fnmatch.fnmatchcase(kind, pattern) for pattern in heading):
                documented |= rows
        missing += [f"{kind}.{key}" for key in sorted(keys - documented)]
    return missing


def test_every_config_key_is_documented(schema: Schema) -> None:
    """Every key the loader accepts has a row in docs/configuration.md, in a section whose heading names its table
    (`### \\`[routes.timeouts]\\``), its name in backticks in the row's first cell; every top-level table has a
    section."""
    missing = _undocumented(schema, CONFIGURATION.read_text())
    assert not missing, f"keys the loader accepts that docs/configuration.md does not document: {missing}"


def test_a_key_missing_from_the_docs_is_found(schema: Schema) -> None:
    """The check above fails when a key's row is removed (here `max_request_line_bytes`)."""
    text = CONFIGURATION.read_text()
    without = "\n".join(line for line in text.splitlines() if not line.startswith("| `max_request_line_bytes`"))
    assert without != text
    assert "limits.max_request_line_bytes" in _undocumented(schema, without)


# --- the TOML examples ----------------------------------------------------------------------------------------


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _toml_blocks() -> list[tuple[str, str]]:
    """Every fenced ```toml block of README.md and docs/, and every docs/examples/*.toml file, with where it is."""
    found = []
    for path in _documents():
        lines = path.read_text().splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            if start is None and line.strip() == "```toml":
                start = number
            elif start is not None and line.strip() == "```":
                found.append((f"{path.relative_to(ROOT)}:{start}", "\n".join(lines[start : number - 1]) + "\n"))
                start = None
    for path in sorted((DOCS / "examples").glob("*.toml")):
        found.append((str(path.relative_to(ROOT)), path.read_text()))
    return found


def _is_complete(text: str) -> bool:
    """A whole config (it has listeners and routes) rather than a fragment of one."""
    data = tomllib.loads(text)
    return "listeners" in data and "routes" in data


EXAMPLES = _toml_blocks()
COMPLETE = [(where, text) for where, text in EXAMPLES if _is_complete(text)]


def test_there_are_examples_to_check() -> None:
    """README's walk-through config is among the complete examples, so the check below checks something."""
    assert any(where.startswith("README.md") for where, _ in COMPLETE)
    assert len(COMPLETE) >= 3


@pytest.fixture(scope="module")
def example_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the files the examples name, made as docs/tls.md makes them (trustme): cert.pem,
    key.pem and ca.pem."""
    folder = tmp_path_factory.mktemp("examples")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost")
    issued.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    issued.private_key_pem.write_to_path(str(folder / "key.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return folder


@pytest.mark.parametrize(("where", "text"), COMPLETE, ids=[where for where, _ in COMPLETE])
def test_complete_examples_pass_check(
    where: str, text: str, example_files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every complete config in README.md and docs/ passes `twistd gateway --config FILE --check`."""
    path = example_files / (re.sub(r"[^A-Za-z0-9]+", "-", where) + ".toml")
    path.write_text(text)
    with pytest.raises(SystemExit) as info:
        tap.Options().parseOptions(["--config", str(path), "--check"])
    out, err = capsys.readouterr()
    assert info.value.code == 0, f"{where} does not pass --check:\n{err}"
    assert out.strip().endswith(": OK")


def _unknown_keys(data: dict[str, Any], kind: str, schema: Schema) -> Iterator[str]:
    """The keys of a fragment of a config that no table of their kind accepts."""
    if kind not in schema.keys:
        return  # a map of free names (a JWT method's claim_headers)
    for key, value in data.items():
        if key not in schema.keys[kind]:
            yield f"{kind}.{key}".lstrip(".")
            continue
        inner = f"{kind}.{key}".lstrip(".")
        if inner in schema.named and isinstance(value, dict):
            for item in value.values():
                if isinstance(item, dict):
                    yield from _unknown_keys(item, f"{inner}.{NAME}", schema)
        elif isinstance(value, dict):
            yield from _unknown_keys(value, inner, schema)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                yield from _unknown_keys(item, inner, schema)


@pytest.mark.parametrize(("where", "text"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_every_example_uses_known_keys(where: str, text: str, schema: Schema) -> None:
    """Every TOML block, fragments included, is valid TOML whose every key is one the loader accepts where it
    stands."""
    unknown = list(_unknown_keys(tomllib.loads(text), "", schema))
    assert not unknown, f"{where}: keys the loader does not accept: {unknown}"


# --- links and commands ---------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_relative_links_resolve() -> None:
    """Every relative link in README.md and docs/ names a file that exists, and an anchor of a heading in it."""
    broken = []
    for path in _documents():
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"


def _commands(text: str) -> list[str]:
    """The ```sh blocks of `text`, indented or not, each as its stripped text."""
    return [block.strip() for block in re.findall(r"^ *```sh\n(.*?)\n *```", text, flags=re.DOTALL | re.MULTILINE)]


def test_readme_command_2_is_what_ci_runs() -> None:
    """README's command 2 is, character for character, the last line of .ci/run."""
    section = _two_commands()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert _commands(section)[1] == ci


def _two_commands() -> str:
    """The "Two commands" section of README.md."""
    text = (ROOT / "README.md").read_text()
    return text.split("## Two commands", 1)[1].split("\n## ", 1)[0]


def test_readme_command_1_runs_the_example_config() -> None:
    """README's command 1 runs the demo and `twistd gateway` with etc/gateway.toml."""
    first = _commands(_two_commands())[0]
    assert "-m gateway.demo" in first and "gateway --config etc/gateway.toml" in first
