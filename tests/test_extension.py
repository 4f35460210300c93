"""The extension's contract: init_app, per-app state, config precedence, failing fast."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import pytest
from flask import Blueprint, Flask
from flask_wtf import CSRFProtect
from werkzeug.test import TestResponse

from flask_cio_rudder import CioEvent, CioRudder, Forwarder, NullForwarder
from flask_cio_rudder.outbox import OutboxForwarder

from .conftest import SIGNING_KEY, sample

Post = Callable[..., TestResponse]


def bare_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(TESTING=True, **config)
    return app


def test_app_factory_pattern_keeps_state_in_app_extensions() -> None:
    ext = CioRudder(signing_key=SIGNING_KEY, forwarder="none")
    first, second = bare_app(), bare_app(CIO_RUDDER_SIGNING_KEY="other-key")
    ext.init_app(first)
    ext.init_app(second)
    assert not hasattr(ext, "app")
    assert first.extensions["cio_rudder"].signing_keys == (SIGNING_KEY,)
    assert second.extensions["cio_rudder"].signing_keys == ("other-key",)
    assert first.extensions["cio_rudder"].forwarder is not second.extensions["cio_rudder"].forwarder


def test_several_apps_in_one_process_receive_independently(post: Post) -> None:
    ext = CioRudder(signing_key=SIGNING_KEY, forwarder="none")
    first, second = bare_app(), bare_app(CIO_RUDDER_WEBHOOK_PATH="/hooks/cio")
    ext.init_app(first)
    ext.init_app(second)
    assert post(first.test_client(), sample("opened")).json["status"] == "accepted"
    # The second app has its own path and its own memory of seen events.
    assert post(second.test_client(), sample("opened")).status_code == 404
    raw_client = second.test_client()
    from flask_cio_rudder.testing import encode, signature_headers

    raw = encode(sample("opened"))
    response = raw_client.post("/hooks/cio", data=raw, headers=signature_headers(raw, SIGNING_KEY))
    assert response.json["status"] == "accepted"


def test_constructor_options_are_defaults_that_app_config_overrides() -> None:
    ext = CioRudder(signing_key="from-options", forwarder="none", max_body_bytes=1234)
    app = bare_app(CIO_RUDDER_SIGNING_KEY="from-config")
    ext.init_app(app)
    assert app.config["CIO_RUDDER_SIGNING_KEY"] == "from-config"
    assert app.config["CIO_RUDDER_MAX_BODY_BYTES"] == 1234
    assert app.extensions["cio_rudder"].signing_keys == ("from-config",)


def test_every_default_lands_in_app_config() -> None:
    app = bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="none")
    CioRudder(app)
    assert app.config["CIO_RUDDER_VERIFY_SIGNATURE"] is True
    assert app.config["CIO_RUDDER_WEBHOOK_PATH"] == "/webhooks/customerio"
    assert app.config["CIO_RUDDER_MAX_TIMESTAMP_AGE"] is None
    assert "/webhooks/customerio" in {rule.rule for rule in app.url_map.iter_rules()}


def test_an_unknown_option_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="signing_kye"):
        CioRudder(signing_kye="typo")


def test_init_app_twice_on_one_app_is_refused() -> None:
    app = bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="none")
    ext = CioRudder(app)
    with pytest.raises(RuntimeError, match="already registered"):
        ext.init_app(app)


@pytest.mark.parametrize("path", [5, None, "webhooks/customerio", "/hooks/<tenant>"])
def test_a_webhook_path_that_is_no_url_path_fails_fast_naming_the_key(path: Any) -> None:
    with pytest.raises(RuntimeError, match="CIO_RUDDER_WEBHOOK_PATH must be a URL path starting with '/'"):
        CioRudder(
            bare_app(
                CIO_RUDDER_FORWARDER="none", CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_WEBHOOK_PATH=path
            )
        )


def test_an_init_app_that_fails_closes_its_forwarder_and_can_be_called_again() -> None:
    """Its sender threads and files are let go, and once the cause is fixed, init_app works."""
    closed: list[Forwarder] = []

    class Recorded(NullForwarder):
        def close(self) -> None:
            closed.append(self)

    app = bare_app(CIO_RUDDER_FORWARDER=Recorded, CIO_RUDDER_SIGNING_KEY=SIGNING_KEY)
    taken = Blueprint("cio_rudder", __name__)  # the host app's own blueprint of that name
    app.register_blueprint(taken)
    with pytest.raises(ValueError, match="cio_rudder"):
        CioRudder(app)
    assert len(closed) == 1
    assert "cio_rudder" not in app.extensions
    del app.blueprints["cio_rudder"]  # the host renames its blueprint
    CioRudder(app)
    assert isinstance(app.extensions["cio_rudder"].forwarder, Recorded)


def test_a_misspelt_setting_is_logged_with_the_one_it_resembles(caplog: pytest.LogCaptureFixture) -> None:
    """It would otherwise pass silently, and its default would apply (a missing key is caught; a
    misspelt optional one, such as a batch size or a lease, is not)."""
    CioRudder(
        bare_app(
            CIO_RUDDER_FORWARDER="none",
            CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
            CIO_RUDDER_OUTBOX_BATCHSIZE=10,
            CIO_RUDDER_SOMETHING_ELSE=1,
        )
    )
    messages = [record.getMessage() for record in caplog.records]
    assert [message for message in messages if "is not a Flask-CIO-Rudder setting" in message] == [
        "CIO_RUDDER_OUTBOX_BATCHSIZE is not a Flask-CIO-Rudder setting (did you mean "
        "CIO_RUDDER_OUTBOX_BATCH_SIZE?); it is ignored.",
        "CIO_RUDDER_SOMETHING_ELSE is not a Flask-CIO-Rudder setting; it is ignored.",
    ]


def test_a_missing_signing_key_fails_fast_naming_the_key() -> None:
    with pytest.raises(RuntimeError, match="CIO_RUDDER_SIGNING_KEY is not set"):
        CioRudder(bare_app(CIO_RUDDER_FORWARDER="none"))


@pytest.mark.parametrize(
    ("variable", "hint"),
    [
        ("FLASK_CIO_RUDDER_SIGNING_KEY", "call app.config.from_prefixed_env() before init_app"),
        (
            "CIO_RUDDER_SIGNING_KEY",
            "which Flask does not read by itself: name it FLASK_CIO_RUDDER_SIGNING_KEY",
        ),
    ],
)
def test_a_setting_left_in_the_environment_is_named_as_missing_with_how_to_read_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, hint: str
) -> None:
    monkeypatch.setenv(variable, "")  # a secret that did not render
    with pytest.raises(RuntimeError, match=f"{variable} is in the environment, but empty"):
        CioRudder(bare_app(CIO_RUDDER_FORWARDER="none"))
    monkeypatch.setenv(variable, "whsec-top-secret")
    with pytest.raises(RuntimeError, match="CIO_RUDDER_SIGNING_KEY is not set") as raised:
        CioRudder(bare_app(CIO_RUDDER_FORWARDER="none"))
    assert hint in str(raised.value) and "whsec-top-secret" not in str(raised.value)
    monkeypatch.setenv(variable.replace("SIGNING_KEY", "WRITE_KEY"), "write-key")
    monkeypatch.setenv(variable.replace("SIGNING_KEY", "DATA_PLANE_URL"), "https://dp.example.com")
    for missing in ("CIO_RUDDER_WRITE_KEY", "CIO_RUDDER_DATA_PLANE_URL"):
        config = {"CIO_RUDDER_WRITE_KEY": "write-key", "CIO_RUDDER_DATA_PLANE_URL": "https://dp.example.com"}
        del config[missing]
        with pytest.raises(RuntimeError, match=missing) as raised:
            CioRudder(bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="sync", **config))
        assert hint.replace("SIGNING_KEY", missing.removeprefix("CIO_RUDDER_")) in str(raised.value)


def test_a_signing_key_of_digits_read_from_the_environment_gets_a_hint_not_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLASK_CIO_RUDDER_SIGNING_KEY", "20240501")
    app = bare_app(CIO_RUDDER_FORWARDER="none")
    app.config.from_prefixed_env()  # JSON: the number 20240501
    with pytest.raises(
        RuntimeError, match=r"not int: .* reads FLASK_CIO_RUDDER_SIGNING_KEY as JSON"
    ) as failed:
        CioRudder(app)
    assert "20240501" not in str(failed.value)


def test_no_signing_key_is_fine_when_verification_is_off(caplog: pytest.LogCaptureFixture) -> None:
    CioRudder(bare_app(CIO_RUDDER_FORWARDER="none", CIO_RUDDER_VERIFY_SIGNATURE=False))
    assert "CIO_RUDDER_VERIFY_SIGNATURE is off" in caplog.text


@pytest.mark.parametrize("value", [123, ["ok", ""], [None]])
def test_a_malformed_signing_key_fails_fast(value: Any) -> None:
    with pytest.raises(RuntimeError, match="CIO_RUDDER_SIGNING_KEY must be"):
        CioRudder(bare_app(CIO_RUDDER_FORWARDER="none", CIO_RUDDER_SIGNING_KEY=value))


@pytest.mark.parametrize(
    "pasted", ["whsec-SECRET\n", " whsec-SECRET", "whsec-\u200bSECRET", ["whsec-other", "whsec-SECRET\r\n"]]
)
def test_a_signing_key_read_with_a_stray_character_fails_at_init_naming_the_key_not_quoting_it(
    pasted: Any,
) -> None:
    """Read from a secret file with its newline, the key would sign nothing Customer.io sends: every
    webhook refused (401), while send-test, signing with the same key, passes."""
    with pytest.raises(RuntimeError, match="CIO_RUDDER_SIGNING_KEY starts or ends with a space") as failed:
        CioRudder(bare_app(CIO_RUDDER_FORWARDER="none", CIO_RUDDER_SIGNING_KEY=pasted))
    assert "SECRET" not in str(failed.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CIO_RUDDER_MAX_TIMESTAMP_AGE", "300"),  # as read from an environment variable
        ("CIO_RUDDER_MAX_TIMESTAMP_AGE", 0),
        ("CIO_RUDDER_MAX_BODY_BYTES", "5242880"),
        ("CIO_RUDDER_MAX_BODY_BYTES", -1),
        ("CIO_RUDDER_MAX_TIMESTAMP_AGE", float("nan")),
    ],
)
def test_a_limit_that_is_not_a_positive_number_fails_at_init_naming_the_key(key: str, value: Any) -> None:
    app = bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="none", **{key: value})
    with pytest.raises(RuntimeError, match=f"{key} must be"):
        CioRudder(app)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CIO_RUDDER_TIMEOUT", "10"),  # as os.environ gives it: the sender failed on every batch
        ("CIO_RUDDER_TIMEOUT", -1),
        ("CIO_RUDDER_TIMEOUT", (3, "10")),
        ("CIO_RUDDER_OUTBOX_MAX_AGE", "604800"),
        # "Never": the sender failed on each claim (SQLite: OverflowError; PostgreSQL: bigint out of range)
        ("CIO_RUDDER_OUTBOX_MAX_AGE", float("inf")),
        ("CIO_RUDDER_OUTBOX_MAX_AGE", 1e19),
        ("CIO_RUDDER_TIMEOUT", (float("inf"), 10)),  # sync answered every webhook 500
        ("CIO_RUDDER_TIMEOUT", 1e300),
        ("CIO_RUDDER_SHUTDOWN_TIMEOUT", 1e12),
        ("CIO_RUDDER_OUTBOX_LEASE", 0),
        ("CIO_RUDDER_OUTBOX_LEASE", 2),  # each post was cut to 0.1 s, timed out and was sent again
        ("CIO_RUDDER_SHUTDOWN_TIMEOUT", "5"),
        ("CIO_RUDDER_SHUTDOWN_TIMEOUT", -1),
        ("CIO_RUDDER_OUTBOX_SENDER", "false"),  # would read as on
        ("CIO_RUDDER_FAST_PATH", "false"),
        ("CIO_RUDDER_VERIFY_SIGNATURE", "false"),
        ("CIO_RUDDER_DASHBOARD_READ_ONLY", "no"),
    ],
)
def test_a_setting_of_the_wrong_kind_fails_at_init_naming_the_key(
    key: str, value: Any, tmp_path: Path
) -> None:
    """Not later in the sender, where the events it accepted meanwhile would pile up unsent."""
    app = bare_app(
        CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
        CIO_RUDDER_WRITE_KEY="write-key",
        CIO_RUDDER_DATA_PLANE_URL="http://127.0.0.1:9",
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        **{key: value},
    )
    with pytest.raises(RuntimeError, match=f"{key} must be") as failure:
        CioRudder(app)
    assert ("from_prefixed_env" in str(failure.value)) is isinstance(value, str)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CIO_RUDDER_TIMEOUT", 2.5),
        ("CIO_RUDDER_TIMEOUT", [1, 5]),
        ("CIO_RUDDER_TIMEOUT", 0),  # the default, as before the checks
        ("CIO_RUDDER_SHUTDOWN_TIMEOUT", 0),
        ("CIO_RUDDER_METRICS", 0),  # switches read as bool() reads them, as before: all but strings
        ("CIO_RUDDER_VERIFY_SIGNATURE", 1),
        ("CIO_RUDDER_DASHBOARD_READ_ONLY", None),
        ("CIO_RUDDER_OUTBOX_MAX_AGE", 10**9),  # "never", within a hundred years
        ("CIO_RUDDER_MAX_TIMESTAMP_AGE", float("inf")),  # off, as None
        ("CIO_RUDDER_MAX_BODY_BYTES", 10**400),  # absurd, but no OverflowError
    ],
)
def test_settings_of_the_right_kind_are_taken(key: str, value: Any, tmp_path: Path) -> None:
    app = bare_app(
        CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
        CIO_RUDDER_WRITE_KEY="write-key",
        CIO_RUDDER_DATA_PLANE_URL="http://127.0.0.1:9",
        CIO_RUDDER_OUTBOX_URL=f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
        CIO_RUDDER_OUTBOX_SENDER=False,
        **{key: value},
    )
    CioRudder(app)
    app.extensions["cio_rudder"].forwarder.close()


def test_the_state_kept_per_app_never_shows_the_signing_keys() -> None:
    """Error trackers record the locals of a failing frame, and the webhook's frames hold the state."""
    app = bare_app(CIO_RUDDER_SIGNING_KEY="whsec-top-secret", CIO_RUDDER_FORWARDER="none")
    CioRudder(app)
    assert "whsec-top-secret" not in repr(app.extensions["cio_rudder"])


def test_the_sync_forwarder_needs_a_write_key() -> None:
    app = bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_DATA_PLANE_URL="https://dp.example.com")
    with pytest.raises(RuntimeError, match="CIO_RUDDER_WRITE_KEY is not set"):
        CioRudder(app)


@pytest.mark.parametrize(
    "url",
    [
        None,
        "",
        "dp.example.com",
        "ftp://dp.example.com",
        "https://dp.example.com\n",  # from an environment file with its line break
        "https://dp.example.com /",
        "https://dp.example.com/v1/batch",  # the events would go to /v1/batch/v1/batch
        "https://dp.example.com/v1/webhook?writeKey=secret-write-key",
        "https://dp.example.com/V1/Track/",
        "https://dp.example.com/?",  # an empty query: the posts would go to /?/v1/batch
        "https://dp.example.com#",
        # requests would refuse these on each post, quoting the URL, password and all
        "https://proxyuser:secret-password@dp.example.com:70000",
        "https://proxyuser:secret-password@dp.example.com:443a",
        "https://proxyuser:secret-password@:443",
        "https://my-dataplane..rudderstack.com",
        "https://b\u00fccher..example",
        "https://dp.example.com\u200b",  # a zero-width space copied with it: no name IDNA takes
        "https://dp.example.com/\u200b",  # the posts would go to /%E2%80%8B/v1/batch
        f"https://{'x' * 64}.rudderstack.com",
        # a password's bare @ then /: requests would post to "pass" with the rest in the path
        "https://proxyuser:secret@pass/word@dp.example.com",
    ],
)
def test_the_sync_forwarder_needs_a_data_plane_url(url: Any) -> None:
    app = bare_app(
        CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
        CIO_RUDDER_WRITE_KEY="secret-write-key",
        CIO_RUDDER_DATA_PLANE_URL=url,
    )
    with pytest.raises(RuntimeError, match="CIO_RUDDER_DATA_PLANE_URL") as failure:
        CioRudder(app)
    assert "secret-write-key" not in str(failure.value)
    assert "secret-password" not in str(failure.value) and failure.value.__cause__ is None


def test_an_at_in_a_data_plane_path_is_taken_for_a_password_only_after_credentials() -> None:
    """https://u:secret@pass/word@host would post to "pass"; an @ in a path alone is the path's."""
    config = dict(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="sync", CIO_RUDDER_WRITE_KEY="key")
    CioRudder(bare_app(**config, CIO_RUDDER_DATA_PLANE_URL="https://dp.example.com/@team/rudder"))
    with pytest.raises(
        RuntimeError, match="CIO_RUDDER_DATA_PLANE_URL holds an @ that is not percent-encoded"
    ):
        CioRudder(bare_app(**config, CIO_RUDDER_DATA_PLANE_URL="https://u:pw@dp.example.com/@team/rudder"))


def test_a_url_python_cannot_split_is_refused_without_quoting_it() -> None:
    """Python 3.11 and later refuse brackets in a URL's credentials, quoting them in the error; older
    ones take the URL, as requests does."""
    app = bare_app(
        CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
        CIO_RUDDER_FORWARDER="sync",
        CIO_RUDDER_WRITE_KEY="secret-write-key",
        CIO_RUDDER_DATA_PLANE_URL="https://proxyuser:secret-password[x]@dp.example.com",
    )
    try:
        CioRudder(app)
    except RuntimeError as failure:
        assert "CIO_RUDDER_DATA_PLANE_URL" in str(failure) and failure.__cause__ is None
        assert "secret-password" not in str(failure)
    else:
        app.extensions["cio_rudder"].forwarder.close()


@pytest.mark.parametrize(
    "url",
    [
        "https://dp.example.com",
        "http://127.0.0.1:8080/",
        "http://[::1]:8080",
        "https://example.com/rudder/",
        "https://gateway.example.com/v1/rudderstack",  # a proxy's prefix, whatever it is called
        "https://api.example.com/analytics/v1",
        "http://rudderstack:8080",  # a docker compose service
        "https://\u05e2\u05d1\u05e8\u05d9\u05ea1.example",  # right to left, a digit last (IDNA 2008)
        "https://\u0dc1\u0dca\u200d\u0dbb\u0dd3.example",  # a zero-width joiner in a Sinhala name
    ],
)
def test_a_data_plane_address_with_or_without_a_path_prefix_is_taken(url: str) -> None:
    app = bare_app(
        CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
        CIO_RUDDER_FORWARDER="sync",
        CIO_RUDDER_WRITE_KEY="secret-write-key",
        CIO_RUDDER_DATA_PLANE_URL=url,
    )
    CioRudder(app)
    assert app.extensions["cio_rudder"].forwarder.data_plane.batch_url == url.rstrip("/") + "/v1/batch"


def test_the_outbox_is_the_default_forwarder_kept_in_the_instance_folder(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(
        CIO_RUDDER_SIGNING_KEY=SIGNING_KEY,
        CIO_RUDDER_WRITE_KEY="wk",
        CIO_RUDDER_DATA_PLANE_URL="https://dp.example.com",
        CIO_RUDDER_OUTBOX_SENDER=False,  # nothing may try to reach dp.example.com
    )
    CioRudder(app)
    forwarder = app.extensions["cio_rudder"].forwarder
    try:
        assert isinstance(forwarder, OutboxForwarder)
        assert forwarder.outbox.path == str(tmp_path / "instance" / "cio_rudder_outbox.sqlite3")
        assert (tmp_path / "instance" / "cio_rudder_outbox.sqlite3").exists()
    finally:
        forwarder.close()


def test_an_unknown_forwarder_name_fails_fast_listing_the_choices() -> None:
    app = bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="kafka")
    with pytest.raises(RuntimeError, match=r"CIO_RUDDER_FORWARDER = 'kafka' is unknown.*'sync'"):
        CioRudder(app)


def test_a_forwarder_factory_must_build_a_forwarder() -> None:
    app = bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER=lambda app: object())
    with pytest.raises(RuntimeError, match=r"must build a flask_cio_rudder\.Forwarder"):
        CioRudder(app)


def test_a_custom_forwarder_receives_each_accepted_event(post: Post) -> None:
    class ListForwarder(Forwarder):
        def __init__(self, app: Flask) -> None:
            super().__init__(app)
            self.sent: list[CioEvent] = []

        def send(self, event: CioEvent) -> None:
            self.sent.append(event)

    app = bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER=ListForwarder)
    CioRudder(app)
    post(app.test_client(), sample("clicked"))
    post(app.test_client(), sample("clicked"))
    forwarder = app.extensions["cio_rudder"].forwarder
    assert [event.name for event in forwarder.sent] == ["Email Link Clicked"]


def test_the_none_forwarder_is_available_by_name() -> None:
    app = bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="none")
    CioRudder(app)
    assert isinstance(app.extensions["cio_rudder"].forwarder, NullForwarder)


@pytest.mark.parametrize("csrf_first", [True, False], ids=["csrf-before", "csrf-after"])
def test_the_webhook_works_in_apps_with_csrf_protection(post: Post, csrf_first: bool) -> None:
    app = bare_app(
        CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="none", SECRET_KEY="s", WTF_CSRF_ENABLED=True
    )

    @app.post("/form")
    def form() -> str:
        return "ok"

    if csrf_first:
        CSRFProtect(app)
        CioRudder(app)
    else:
        CioRudder(app)
        CSRFProtect(app)
    client = app.test_client()
    assert client.post("/form").status_code == 400  # CSRF still guards the app's own forms
    assert post(client, sample("opened")).json["status"] == "accepted"


def test_without_flask_wtf_installed_the_host_apps_requests_run_no_hook_of_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CSRF exemption hook runs before every request of the app; with no Flask-WTF it is not needed."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "flask_wtf" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    app = bare_app(CIO_RUDDER_SIGNING_KEY=SIGNING_KEY, CIO_RUDDER_FORWARDER="none")
    CioRudder(app)
    assert not any(app.before_request_funcs.values())
