"""HTTP routes of the gateway, one module per area; each exposes ``routes() -> list[BaseRoute]``."""
