"""Security properties without I/O: Kafka SASL/TLS options, secrets kept out of reprs and logs,
SQL only parameterised, strict config, tenant-scoped Redis keys."""

from __future__ import annotations

import ast
import ssl
from pathlib import Path
from typing import Any

import faust
import pytest
import structlog
import yaml

import router_worker
from router_worker.config import parse_config
from router_worker.enrich import Keys
from router_worker.errors import ConfigError
from router_worker.faust_app import broker_credentials, faust_options
from router_worker.kafka import client_options, consumer_options, producer_options
from router_worker.logs import processors
from router_worker.settings import DEFAULT_CONFIG, Settings

PASSWORD = "canary-pw-7f3a9"
PACKAGE = Path(router_worker.__file__).parent


def settings(**fields: Any) -> Settings:
    return Settings.model_validate(fields)


# --- Kafka SASL / TLS ----------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_settings_reach_every_aiokafka_client(mechanism: str) -> None:
    s = settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism=mechanism,
                 kafka_sasl_username="router", kafka_sasl_password=PASSWORD)
    for options in (client_options(s), consumer_options(s), producer_options(s)):
        assert options["security_protocol"] == "SASL_SSL"
        assert options["sasl_mechanism"] == mechanism
        assert options["sasl_plain_username"] == "router"
        assert options["sasl_plain_password"] == PASSWORD
        assert isinstance(options["ssl_context"], ssl.SSLContext)
        assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_sasl_ssl_settings_reach_faust_as_sasl_credentials() -> None:
    s = settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                 kafka_sasl_username="router", kafka_sasl_password=PASSWORD)
    credentials = broker_credentials(s)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.username == "router"
    assert credentials.password == PASSWORD
    assert str(credentials.mechanism.value) == "SCRAM-SHA-512"
    assert isinstance(credentials.ssl_context, ssl.SSLContext)
    assert faust_options(s)["broker_credentials"] is credentials or isinstance(
        faust_options(s)["broker_credentials"], faust.SASLCredentials)


def test_sasl_plaintext_has_no_tls_context() -> None:
    s = settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u",
                 kafka_sasl_password=PASSWORD)
    assert "ssl_context" not in client_options(s)
    credentials = broker_credentials(s)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.ssl_context is None


def test_ssl_without_sasl_uses_the_configured_ca(tmp_path: Path) -> None:
    cafile = Path(ssl.get_default_verify_paths().cafile or "")
    if not cafile.is_file():
        pytest.skip("no system CA bundle to stand in for a private CA")
    s = settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(cafile))
    options = client_options(s)
    assert options["security_protocol"] == "SSL"
    assert "sasl_mechanism" not in options
    assert isinstance(broker_credentials(s), faust.SSLCredentials)


def test_plaintext_sends_no_credentials() -> None:
    s = settings()
    assert broker_credentials(s) is None
    assert not {"sasl_mechanism", "ssl_context", "sasl_plain_password"} & client_options(s).keys()


# --- secrets: environment only, never shown --------------------------------------------------


def test_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTER_KAFKA_SASL_PASSWORD", PASSWORD)
    monkeypatch.setenv("ROUTER_REDIS_URL", f"redis://:{PASSWORD}@10.0.0.1:6379/0")
    monkeypatch.setenv("ROUTER_DATABASE_URL", f"postgresql://router:{PASSWORD}@db/router")
    s = Settings()
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == PASSWORD
    assert PASSWORD in s.redis_url.get_secret_value()
    assert PASSWORD in s.database_url.get_secret_value()


def test_settings_repr_str_and_dump_never_show_secrets() -> None:
    s = settings(kafka_sasl_password=PASSWORD, redis_url=f"redis://:{PASSWORD}@h:6379/0",
                 database_url=f"postgresql://u:{PASSWORD}@h/db")
    for shown in (repr(s), str(s), s.model_dump_json(), str(s.model_dump())):
        assert PASSWORD not in shown


def _reads_environment(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and (
                ast.unparse(node.value) == "os.environ"):
            return True
        if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "os.getenv", "os.environ.get"):
            return True
    return False


def test_no_module_reads_the_environment_on_its_own() -> None:
    # Settings are parsed once (settings.py) and passed down; the embedded launcher is the
    # documented exception (it decides which services to start from ROUTER_* URLs), and the
    # benchmark CLI passes the URLs on to the worker processes it starts.
    allowed = {"settings.py", "embedded.py", "bench.py"}  # bench: a CLI tool spawning workers
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if path.name not in allowed and _reads_environment(ast.parse(path.read_text()))]
    assert not offenders, offenders


def test_log_processors_replace_prompt_text_by_a_fingerprint() -> None:
    canary = f"tell nobody {PASSWORD}"
    event: dict[str, Any] = {"event": "x", "prompt": canary, "messages": [{"content": canary}],
                             "text": canary, "texts": [canary], "raw": canary,
                             "request_id": "r1"}
    rendered: Any = event
    for processor in processors(settings(log_format="json"), json_logs=True):
        rendered = processor(None, "info", rendered)
    assert "r1" in rendered
    assert PASSWORD not in rendered


def test_failed_request_log_line_carries_ids_not_prompt() -> None:
    from router_worker.agents.route import Router
    from router_worker.classify.cascade import Cascade
    from router_worker.classify.keyword import keyword_engine_from_config
    from router_worker.config import load_config
    from router_worker.metrics import create_metrics
    from router_worker.validate import Inbound, decode

    config = load_config(DEFAULT_CONFIG)
    router = Router(settings(), config,
                    Cascade(None, keyword_engine_from_config(config), config.thresholds),
                    None, create_metrics())
    canary = f"my prompt is {PASSWORD}"
    value = b'{"request_id": "r1", "prompt": "' + canary.encode() + b'", "tenant_id": 5}'
    inbound = Inbound(value, b"r1", (), "t", 0, 0, 0.0)
    rejected = decode(inbound, 65536)
    with structlog.testing.capture_logs() as logs:
        router._failed(inbound, rejected, __import__("datetime").datetime.now())  # type: ignore[arg-type]
    assert logs
    assert logs[0]["request_id"] == "r1"
    assert PASSWORD not in repr(logs)


# --- SQL: values are always bind parameters --------------------------------------------------

SQL_WORDS = ("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "CREATE ", "DROP ", "ALTER ",
             "SET ", " FROM ", " WHERE ", "TRUNCATE ")
# f-string parts that are identifiers or SQL built from constants, never values
SAFE_CALLS = {"quote_ident"}
SAFE_NAMES = {"names", "select", "unnest", "updates", "i", "kind", "name", "table", "column",
              "columns", "placeholders", "schema_sql", "target", "STAGING"}


def _sql_fstrings() -> list[tuple[str, int, str]]:
    """(file, line, offending expression) for every value interpolated into SQL."""
    problems = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.JoinedStr):
                continue
            literal = "".join(v.value for v in node.values
                              if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if not any(word in literal for word in SQL_WORDS):  # SQL here is upper case
                continue
            for part in node.values:
                if not isinstance(part, ast.FormattedValue):
                    continue
                expr = part.value
                if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and (
                        expr.func.id in SAFE_CALLS):
                    continue
                if isinstance(expr, ast.Name) and expr.id in SAFE_NAMES:
                    continue
                problems.append((str(path.relative_to(PACKAGE)), node.lineno,
                                 ast.unparse(expr)))
    return problems


def test_sql_interpolates_only_quoted_identifiers_and_constant_fragments() -> None:
    problems = _sql_fstrings()
    assert not problems, problems


def test_the_sql_lint_catches_an_interpolated_value(tmp_path: Path) -> None:
    bad = "def q(rid):\n    return f\"SELECT * FROM t WHERE id = '{rid}'\"\n"
    tree = ast.parse(bad)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.JoinedStr))
    exprs = [ast.unparse(p.value) for p in node.values if isinstance(p, ast.FormattedValue)]
    assert exprs == ["rid"]
    assert "rid" not in SAFE_NAMES


# --- config validation -----------------------------------------------------------------------


def test_unknown_top_level_config_key_is_rejected() -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["modles"] = {}
    with pytest.raises(ConfigError, match="modles"):
        parse_config(raw)


def test_unknown_tenant_key_is_rejected() -> None:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.setdefault("tenants", {})["acme"] = {"policy": "normal", "allowed_modles": ["o3"]}
    with pytest.raises(ConfigError, match="allowed_modles"):
        parse_config(raw)


# --- tenant isolation of Redis keys ----------------------------------------------------------


def test_every_tenant_scoped_key_carries_the_tenant_id() -> None:
    keys = Keys("rw:")
    assert keys.tenant("a") != keys.tenant("b")
    assert "acme" in keys.tenant("acme")
    assert "acme" in keys.session("acme", "s1")
    assert keys.session("a", "s") != keys.session("b", "s")


@pytest.mark.parametrize(("a", "b"), [
    (("a", "b:c"), ("a:b", "c")),
    (("t", ":x"), ("t:", "x")),
    (("1:a", "b"), ("1", "a:b")),
])
def test_one_tenant_cannot_address_another_tenants_session(
    a: tuple[str, str], b: tuple[str, str],
) -> None:
    keys = Keys("rw:")
    assert keys.session(*a) != keys.session(*b)


def test_key_prefix_isolates_deployments() -> None:
    assert Keys("blue:").tenant("a") != Keys("green:").tenant("a")
