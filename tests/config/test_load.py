"""Configuration: the shipped files load, bad files fail naming file and key path, and
`llm-proxy serve` exits non-zero on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import EnvSettings, load_config
from proxy.config.env import IDEMPOTENCE_ENV, env_flag
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

GOOD = """
providers:
  openai:
    base_url: https://api.openai.com/v1/
    api_key_env: TEST_OPENAI_KEY
    timeouts: {connect: 2, first_byte: 30}
price_rules:
  gpt4o: {input: 2.5, cached_input: 1.25, output: 10}
aliases:
  smart: {provider: openai, model: gpt-4o, price_rule: gpt4o}
  free: {provider: openai, model: gpt-4o-mini, free: true, tokenizer: cl100k_base}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load() -> None:
    config = load_config(REPO / "model_aliases.yaml", env={})
    assert {"smart", "fast", "local"} <= set(config.aliases)
    demo = load_config(REPO / "proxy" / "devtools" / "demo_aliases.yaml", env={})
    assert demo.aliases["demo"].provider.name == "fake"


def test_good_config_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={"TEST_OPENAI_KEY": "sk-secret"})
    smart = config.aliases["smart"]
    assert smart.provider.base_url == "https://api.openai.com/v1"  # trailing slash dropped
    assert smart.provider.chat_url == "https://api.openai.com/v1/chat/completions"
    assert smart.provider.api_key == "sk-secret"
    assert "sk-secret" not in repr(smart.provider)  # secrets stay out of repr
    assert smart.provider.timeouts.connect == 2 and smart.provider.timeouts.idle == 60
    assert smart.price_rule_id == "gpt4o" and smart.tokenizer == "o200k_base"
    assert config.aliases["free"].price_rule is None
    assert config.aliases["free"].price_rule_id == "free"
    assert config.server.max_body_bytes == 8 * 1024 * 1024
    assert config.events.topic == "credit.charge.requested"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("provider: openai, model: gpt-4o,", "provider: opnai, model: gpt-4o,"),
            "aliases.smart.provider: unknown provider 'opnai'",
        ),
        (
            ("price_rule: gpt4o}", "price_rule: gpt5}"),
            "aliases.smart.price_rule: unknown price rule 'gpt5'",
        ),
        (
            ("price_rule: gpt4o}", "tokenizer: o200k_base}"),
            "aliases.smart.price_rule: required (or say free: true)",
        ),
        (
            ("tokenizer: cl100k_base", "tokenizer: p50k_base"),
            "aliases.free.tokenizer: unknown tokenizer 'p50k_base'",
        ),
        (("input: 2.5,", "input: abc,"), "price_rules.gpt4o.input"),
        (
            ("base_url: https://api.openai.com/v1/", "base_url: api.openai.com"),
            "providers.openai.base_url: must start with http:// or https://",
        ),
        (("connect: 2", "connect: -1"), "providers.openai.timeouts.connect: must be a positive"),
        (("timeouts:", "timeout:"), "providers.openai.timeout: unknown key"),
        (("aliases:", "alias:"), "alias: unknown key"),
    ],
)
def test_bad_config_names_file_and_key_path(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert message in text, text


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "providers: [unclosed"))
    with pytest.raises(ConfigError, match="providers: required section is missing"):
        load_config(write(tmp_path, "aliases: {}"))


def test_serve_exits_non_zero_on_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("provider: openai, model: gpt-4o,", "provider: opnai,"))
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert f"{path}: aliases.smart" in proc.stderr


def test_config_path_and_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_PROXY_CONFIG", "/etc/llm/aliases.yaml")
    assert EnvSettings.from_env().config_file(None) == "/etc/llm/aliases.yaml"
    assert EnvSettings.from_env().config_file("cli.yaml") == "cli.yaml"
    monkeypatch.delenv("LLM_PROXY_CONFIG")
    assert EnvSettings.from_env().config_file(None) == "model_aliases.yaml"
    settings = EnvSettings.from_env(
        {
            "REDIS_URL": " redis://r:6379/0 ",
            "KAFKA_BOOTSTRAP_SERVERS": "",
            "LLM_PROXY_KAFKA_IDEMPOTENCE": "false",
        }
    )
    assert settings.redis_url == "redis://r:6379/0"
    assert settings.kafka_bootstrap is None
    assert settings.kafka_idempotent is False
    assert settings.outbox_path == "data/outbox.sqlite3"


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, True), ("", True), ("false", False), ("0", False), ("YES", True)]
)
def test_idempotence_knob(raw: str | None, expected: bool) -> None:
    environ = {} if raw is None else {IDEMPOTENCE_ENV: raw}
    assert env_flag(environ, IDEMPOTENCE_ENV, True) is expected


def test_idempotence_knob_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match=IDEMPOTENCE_ENV):
        env_flag({IDEMPOTENCE_ENV: "sometimes"}, IDEMPOTENCE_ENV, True)


# -- duplicate keys (issue 16) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD + "  smart: {provider: openai, model: gpt-4o-mini, free: true}\n",
            "aliases.yaml: line 12: aliases.smart: duplicate key 'smart' (first at line 10)",
        ),
        (
            GOOD.replace("output: 10}", "output: 10, input: 0}"),
            "line 8: price_rules.gpt4o.input: duplicate key 'input' (first at line 8)",
        ),
        (
            GOOD + "auth:\n  service_keys:\n    - {name: a, name: b}\n",
            "line 14: auth.service_keys[0].name: duplicate key 'name'",
        ),
        (
            GOOD + "providers: {}\n",
            "line 12: providers: duplicate key 'providers' (first at line 2)",
        ),
    ],
)
def test_duplicate_keys_anywhere_are_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert message in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "aliases.yaml"))


# -- allow_params and cost in band (issue 16) ----------------------------------------------

PRICED = """
providers:
  openai: {base_url: "https://api.openai.com/v1"}
price_rules:
  full:
    input: 2.5
    output: 10
    audio_input: 40
    audio_output: 80
    request_fee: 25
    service_tiers: {priority: {multiplier: 2}}
  plain: {input: 2.5, output: 10}
aliases:
"""


def test_allow_params_and_cost_in_band(tmp_path: Path) -> None:
    text = PRICED + (
        "  a: {provider: openai, model: m, price_rule: full, cost_in_band: true,\n"
        "      allow_params: [service_tier, audio, web_search_options, route]}\n"
        "  b: {provider: openai, model: m, price_rule: plain}\n"
    )
    config = load_config(write(tmp_path, text), env={})
    a, b = config.aliases["a"], config.aliases["b"]
    assert a.allow_params == {"service_tier", "audio", "web_search_options", "route"}
    assert (a.cost_in_band, b.cost_in_band, b.allow_params) == (True, False, frozenset())


@pytest.mark.parametrize(
    ("alias", "message"),
    [
        ("{price_rule: plain, allow_params: [service_tier]}", "'service_tier' needs service_tiers"),
        (
            "{price_rule: plain, allow_params: [audio]}",
            "'audio' needs audio_input and audio_output",
        ),
        (
            "{price_rule: plain, allow_params: [web_search_options]}",
            "'web_search_options' needs a request_fee above 0",
        ),
        ("{price_rule: full, allow_params: [temperature]}", "'temperature' is always accepted"),
        ("{price_rule: full, allow_params: [modalities]}", "covered by 'audio'"),
        ("{price_rule: full, allow_params: [3]}", "allow_params[0]: must be a request field name"),
        ("{price_rule: full, allow_params: service_tier}", "allow_params: must be a list"),
        ("{price_rule: full, cost_in_band: 1}", "cost_in_band: must be true or false"),
    ],
)
def test_allow_params_errors(tmp_path: Path, alias: str, message: str) -> None:
    text = PRICED + "  a: " + alias.replace("{", "{provider: openai, model: m, ", 1) + "\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert "aliases.a." in str(info.value) and message in str(info.value)


def test_allowing_a_price_param_needs_a_version_that_prices_it(tmp_path: Path) -> None:
    text = (
        PRICED.replace(
            "    request_fee: 25\n",
            "    versions: [{effective_from: '2027-01-01T00:00:00Z', input: 2, output: 8,\n"
            "                request_fee: 3}]\n",
        )
        + "  a: {provider: openai, model: m, price_rule: full,\n"
        + "      allow_params: [web_search_options]}\n"
    )
    load_config(write(tmp_path, text), env={})  # the 2027 version prices web search
    text = text.replace("request_fee: 3", "request_fee: 0")
    with pytest.raises(ConfigError, match="'web_search_options' needs a request_fee above 0"):
        load_config(write(tmp_path, text), env={})


DISCONNECT = """
providers:
  reasoner:
    base_url: https://api.example.invalid/v1
    on_client_disconnect: drain
    drain_timeout_s: 20
    drain_max_bytes: 1000000
price_rules:
  r: {input: 1, output: 2}
aliases:
  think: {provider: reasoner, model: r1, price_rule: r}
  quick: {provider: reasoner, model: r1, price_rule: r, on_client_disconnect: abort}
  patient: {provider: reasoner, model: r1, price_rule: r, drain_timeout_s: 120}
"""


def test_disconnect_policy_on_providers_and_aliases(tmp_path: Path) -> None:
    from proxy.config.model import DisconnectPolicy, OnDisconnect

    config = load_config(write(tmp_path, DISCONNECT), env={})
    drain = DisconnectPolicy(OnDisconnect.DRAIN, 20.0, 1_000_000)
    assert config.providers["reasoner"].disconnect == drain
    assert config.aliases["think"].disconnect == drain
    assert config.aliases["quick"].disconnect == DisconnectPolicy(
        OnDisconnect.ABORT, 20.0, 1_000_000
    )
    assert config.aliases["patient"].disconnect.drain_timeout_s == 120
    default = load_config(write(tmp_path, GOOD), env={})
    assert default.aliases["smart"].disconnect == DisconnectPolicy()  # abort


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "on_client_disconnect: drain",
            "on_client_disconnect: wait",
            "providers.reasoner.on_client_disconnect: must be 'abort' or 'drain', got 'wait'",
        ),
        (
            "drain_timeout_s: 20",
            "drain_timeout_s: 0",
            "providers.reasoner.drain_timeout_s: must be a positive number, got 0",
        ),
        (
            "drain_timeout_s: 120}",
            "drain_max_bytes: 1.5}",
            "aliases.patient.drain_max_bytes: must be a positive whole number, got 1.5",
        ),
    ],
)
def test_bad_disconnect_policies_name_the_key(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, DISCONNECT.replace(old, new)), env={})
    assert str(info.value).endswith(message)


ENDPOINTS = """
providers:
  openai: {base_url: https://api.openai.com/v1}
  chatonly: {base_url: https://chat.example/v1, responses: false}
price_rules:
  r: {input: 1, output: 2}
aliases:
  all: {provider: openai, model: m, price_rule: r,
        endpoints: [chat, responses, embeddings, completions]}
  vectors: {provider: openai, model: e, price_rule: r, endpoints: [embeddings]}
  plain: {provider: openai, model: m, price_rule: r}
  old: {provider: chatonly, model: m, price_rule: r, endpoints: [chat, responses]}
"""


def test_alias_endpoints_and_provider_responses(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ENDPOINTS), env={})
    a = config.aliases
    assert a["all"].endpoints == {"chat.completions", "responses", "embeddings", "completions"}
    assert a["vectors"].endpoints == {"embeddings"}
    assert a["plain"].endpoints == {"chat.completions"}  # the default
    assert config.providers["openai"].responses and not config.providers["chatonly"].responses
    assert a["all"].serves("responses") and not a["old"].serves("responses")
    assert a["old"].serves("chat.completions") and not a["vectors"].serves("chat.completions")


@pytest.mark.parametrize(
    ("new", "message"),
    [
        ("endpoints: [embeddings]", None),
        ("endpoints: [embedding]", "aliases.vectors.endpoints[0]: unknown endpoint 'embedding'"),
        ("endpoints: []", "aliases.vectors.endpoints: name at least one endpoint"),
        ("endpoints: chat", "aliases.vectors.endpoints: must be a list"),
    ],
)
def test_bad_endpoints_name_the_key(tmp_path: Path, new: str, message: str | None) -> None:
    text = ENDPOINTS.replace("endpoints: [embeddings]", new)
    if message is None:
        load_config(write(tmp_path, text), env={})
        return
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert message in str(info.value)


ADMISSION = (
    GOOD.replace(
        "smart: {provider: openai, model: gpt-4o, price_rule: gpt4o}",
        "smart: {provider: openai, model: gpt-4o, price_rule: gpt4o, reserve_output_tokens: 800,"
        " on_insufficient: clamp, clamp_min_tokens: 32}",
    )
    + "guard: {mode: reserve, hold_ttl_s: 120, fail: closed}\n"
)


def test_admission_settings(tmp_path: Path) -> None:
    from proxy.config.model import (
        DEFAULT_RESERVE_OUTPUT_TOKENS,
        FailPolicy,
        GuardMode,
        OnInsufficient,
    )

    config = load_config(write(tmp_path, ADMISSION), env={})
    smart = config.aliases["smart"]
    assert (smart.reserve_output_tokens, smart.on_insufficient, smart.clamp_min_tokens) == (
        800,
        OnInsufficient.CLAMP,
        32,
    )
    assert (config.guard.mode, config.guard.hold_ttl_s, config.guard.fail) == (
        GuardMode.RESERVE,
        120.0,
        FailPolicy.CLOSED,
    )
    default = load_config(write(tmp_path, GOOD), env={})
    assert default.guard.mode is GuardMode.RESERVE and default.guard.fail is FailPolicy.OPEN
    assert default.aliases["smart"].reserve_output_tokens == DEFAULT_RESERVE_OUTPUT_TOKENS
    assert default.aliases["smart"].on_insufficient is OnInsufficient.REFUSE


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("mode: reserve", "mode: hold", "guard.mode: must be 'reserve' or 'check', got 'hold'"),
        ("fail: closed", "fail: shut", "guard.fail: must be 'open' or 'closed', got 'shut'"),
        ("hold_ttl_s: 120", "hold_ttl_s: 0", "guard.hold_ttl_s: must be a positive number, got 0"),
        (
            "on_insufficient: clamp",
            "on_insufficient: beg",
            "aliases.smart.on_insufficient: must be 'refuse' or 'clamp', got 'beg'",
        ),
        (
            "reserve_output_tokens: 800",
            "reserve_output_tokens: 0",
            "aliases.smart.reserve_output_tokens: must be a positive whole number, got 0",
        ),
    ],
)
def test_bad_admission_settings_name_the_key(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ADMISSION.replace(old, new)), env={})
    assert str(info.value).endswith(message)


def test_redis_cluster_flag_from_env() -> None:
    assert EnvSettings.from_env({"LLM_PROXY_REDIS_CLUSTER": "true"}).redis_cluster
    assert not EnvSettings.from_env({}).redis_cluster
