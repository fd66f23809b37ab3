"""Transports: the only code that talks to the network on the way out."""
