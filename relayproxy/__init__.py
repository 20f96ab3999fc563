"""relayproxy: record POP3/IMAP logins in relayers.db for POP-before-SMTP relaying."""

__version__ = "0.1.0"
