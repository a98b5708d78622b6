"""The gateway's configuration: the session layer's :class:`sessiongate.Settings` plus what only a gateway has.

The library knows nothing of model providers, chat platforms, tokens or the
HTTP server; those sections live here. Keys, environment names
(``SESSIONGATE_SERVER__PORT``) and error messages are the same as for the
library's sections, because loading is inherited.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sessiongate import Settings, SettingsSection

__all__ = [
    "AuthSettings",
    "ChannelSettings",
    "GatewaySettings",
    "HistorySettings",
    "ProviderSettings",
    "ServerSettings",
    "SlackSettings",
    "TelegramSettings",
]


class ProviderSettings(SettingsSection):
    id: str = Field(min_length=1, max_length=64)
    type: Literal["echo", "openai"]
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    timeout_ms: int = Field(30_000, ge=1, le=600_000)
    delay_ms: int = Field(0, ge=0, le=600_000, description="echo only: simulated model time")

    @property
    def longest_call_ms(self) -> float:
        """The longest one call may take before it fails (an echo provider takes exactly ``delayMs``)."""
        return float(self.delay_ms if self.type == "echo" else self.timeout_ms)

    @model_validator(mode="after")
    def _openai_needs_base_url(self) -> ProviderSettings:
        if self.type == "openai" and not self.base_url:
            raise ValueError("an openai provider needs baseUrl")
        return self


class TelegramSettings(SettingsSection):
    secret_token: str | None = None
    bot_token_env: str = "TELEGRAM_BOT_TOKEN"
    api_base: str = "https://api.telegram.org"


class SlackSettings(SettingsSection):
    signing_secret_env: str = "SLACK_SIGNING_SECRET"
    bot_token_env: str = "SLACK_BOT_TOKEN"
    api_base: str = "https://slack.com/api"


class ChannelSettings(SettingsSection):
    telegram: TelegramSettings | None = None
    slack: SlackSettings | None = None


class AuthSettings(SettingsSection):
    tokens: list[str] = Field(default_factory=list)


class ServerSettings(SettingsSection):
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65_535)
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(1_048_576, ge=1, le=64 * 1_048_576)
    log_format: Literal["text", "json"] = "text"
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed to call the API from a browser (default: same origin only)"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses or networks whose X-Forwarded-For names the client"
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, proxies: object) -> object:
        """Also ``"10.0.0.1, 10.1.0.0/16"``: the form proxy settings usually take in an environment."""
        return [part.strip() for part in proxies.split(",") if part.strip()] if isinstance(proxies, str) else proxies

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses_or_networks(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address or network (CIDR)") from None
        return proxies


class HistorySettings(SettingsSection):
    """What a turn sends to the model: the newest records only, so a long chat never outgrows its context."""

    max_messages: int = Field(
        50, ge=1, le=100_000, description="most transcript records (the newest) a turn sends to the model"
    )


class GatewaySettings(Settings):
    """The whole gateway configuration. ``GatewaySettings()`` is the embedded default: it runs as is."""

    providers: list[ProviderSettings] = Field(
        default_factory=lambda: [ProviderSettings(id="echo", type="echo")], min_length=1
    )
    channels: ChannelSettings = ChannelSettings()
    auth: AuthSettings = AuthSettings()
    server: ServerSettings = ServerSettings()
    history: HistorySettings = HistorySettings()

    @property
    def longest_turn_ms(self) -> float:
        """The longest a turn's model calls can take: every provider tried, each to its limit."""
        return sum(provider.longest_call_ms for provider in self.providers)

    @field_validator("providers")
    @classmethod
    def _unique_provider_ids(cls, providers: list[ProviderSettings]) -> list[ProviderSettings]:
        ids = [p.id for p in providers]
        if len(ids) != len(set(ids)):
            raise ValueError(f"provider ids must be unique, got {ids}")
        return providers
