"""keyrelay: API-key authenticated multi-tenant outbound relay for Postfix."""

__version__ = "0.1.0"
