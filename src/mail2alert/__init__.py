"""mail2alert: an SMTP relay that routes CI alert mails to the right people by rules."""

__version__ = "0.1.0"
